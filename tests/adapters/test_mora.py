"""MoRA: ΔW materialised equals the forward update (and an independent construction), parameter budget,
merge, the tunelab on-disk format, config validation."""

import math

import pytest
import torch
from adapter_helpers import batch, logits, make, perturb
from pydantic import ValidationError
from torch import nn

from tunelab.adapters import base, lora, mora, native_format
from tunelab.errors import TunelabError

SHAPES = [(64, 64), (64, 32), (32, 96), (96, 20), (10, 70)]  # square, wide, tall, ragged, r̂ > in


def layer(d_in, d_out, kind, r=8, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(d_in, d_out)
    m = mora.MoraLinear(lin, mora.mora_rank(d_in, d_out, r, kind), kind)
    with torch.no_grad():
        m.mora_M.normal_()
    return lin, m


@pytest.mark.parametrize("kind", sorted(mora._PARTS))
@pytest.mark.parametrize("shape", SHAPES)
def test_delta_weight_equals_forward_delta(kind, shape):
    lin, m = layer(*shape, kind)
    x = torch.randn(3, 5, shape[0])
    with torch.no_grad():
        got = m(x) - lin(x)
        want = x @ m.delta_weight().T
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _pad_matrix(d_in, width):
    """[width, d_in] 0/1: row i copies input i mod d_in (wrap-around padding)."""
    P = torch.zeros(width, d_in)
    P[torch.arange(width), torch.arange(width) % d_in] = 1
    return P


@pytest.mark.parametrize("shape", SHAPES)
def test_sharing_matches_independent_construction(shape):
    d_in, d_out = shape
    _, m = layer(d_in, d_out, "sharing")
    rh, M = m.r_hat, m.mora_M.detach()
    n = math.ceil(d_in / rh)
    # compress: sum of blocks of the padded input; decompress: tile to d_out
    C = torch.zeros(rh, n * rh)
    C[torch.arange(n * rh) % rh, torch.arange(n * rh)] = 1
    D = torch.zeros(d_out, rh)
    D[torch.arange(d_out), torch.arange(d_out) % rh] = 1
    want = D @ M @ C @ _pad_matrix(d_in, n * rh)
    torch.testing.assert_close(m.delta_weight().detach(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_rotation_matches_independent_construction(shape):
    d_in, d_out = shape
    _, m = layer(d_in, d_out, "rotation")
    rh, M = m.r_hat, m.mora_M.detach().double()
    n = math.ceil(d_in / rh)
    blocks = []
    for k in range(n):  # block k: pairs (j, j + r̂/2) rotated by k·θ_j, θ_j = 10000^(-2j/r̂)
        P = torch.zeros(rh, rh, dtype=torch.double)
        for j in range(rh // 2):
            a = k * 10000.0 ** (-2 * j / rh)
            c, s = math.cos(a), math.sin(a)
            P[j, j], P[j, j + rh // 2] = c, -s
            P[j + rh // 2, j + rh // 2], P[j + rh // 2, j] = c, s
        blocks.append(M @ P)
    full = torch.block_diag(*blocks)  # [n·r̂, n·r̂]
    rows = torch.arange(d_out) % (n * rh)  # truncate, or tile when n·r̂ < d_out
    want = full[rows] @ _pad_matrix(d_in, n * rh).double()
    torch.testing.assert_close(m.delta_weight().detach().double(), want, atol=1e-5, rtol=1e-5)
    if n > 1:  # rotation makes the diagonal blocks differ (reshape's are identical)
        assert not torch.allclose(blocks[0], blocks[1])


def test_rank_budget_matches_lora():
    assert mora.mora_rank(4096, 4096, 8) == 256 and mora.mora_rank(4096, 4096, 8, "rotation") == 256
    assert mora.mora_rank(4096, 4096, 8) ** 2 == 8 * (4096 + 4096)  # the paper's example: 65,536 both
    assert mora.mora_rank(64, 128, 8, "rotation") % 2 == 0
    big = torch.nn.utils.skip_init(nn.Linear, 4096, 4096, bias=False)  # shapes matter, values do not
    n_mora = mora.MoraLinear(big, mora.mora_rank(4096, 4096, 8, "rotation"), "rotation").mora_M.numel()
    n_lora = sum(p.numel() for n, p in lora.LoraLinear(big, 8, 16).named_parameters() if "lora_" in n)
    assert n_mora == n_lora == 65536
    for arch, r in (("llama", 8), ("phi3", 2)):
        m_lora, m_mora = make(arch), make(arch)
        n_lora = lora.wrap(m_lora, lora.LoraConfig(r=r)).trainable
        rep = mora.wrap(m_mora, mora.MoraConfig(r=r, type="sharing"))
        layers = [m for _, m in base.adapter_modules(m_mora)]
        assert rep.trainable == sum(m.r_hat ** 2 for m in layers)
        # per module |r̂² − r(in+out)| ≤ r̂ (rounding sqrt to the nearest integer)
        for m in layers:
            assert abs(m.r_hat ** 2 - r * (m.in_features + m.out_features)) <= m.r_hat
        assert abs(rep.trainable - n_lora) <= sum(m.r_hat for m in layers)
        assert abs(rep.trainable - n_lora) / n_lora < 0.1


def test_zero_init_is_the_base_and_merge_equals_unmerged(tmp_path):
    ids = batch()
    model = make("llama")
    want0 = logits(model, ids)
    mora.wrap(model, mora.MoraConfig(r=4, type="rotation"))
    torch.testing.assert_close(logits(model, ids), want0, atol=0, rtol=0)  # M = 0: exactly the base
    perturb(model)
    want = logits(model, ids)
    assert not torch.allclose(want, want0)
    with mora.disabled(model):
        torch.testing.assert_close(logits(model, ids), want0, atol=0, rtol=0)
    # linear_params (used by the chunked lm_head) agrees with forward
    name, layer0 = next(base.adapter_modules(model))
    x = torch.randn(4, layer0.in_features)
    w, b = base.linear_params(layer0)
    torch.testing.assert_close(torch.nn.functional.linear(x, w, b), layer0(x), atol=1e-5, rtol=1e-5)
    merged = mora.merge(model)
    assert merged and not base.has_adapter(model)
    assert type(model.get_submodule(name)) is nn.Linear
    torch.testing.assert_close(logits(model, ids), want, atol=1e-5, rtol=0)


def test_tunelab_format_roundtrip_and_merged_save(tmp_path):
    ids = batch()
    model = make("gemma")  # tied embeddings: lm_head trained fully stays tied to embed_tokens
    cfg = mora.MoraConfig(r=4, type=1, target_modules=["q_proj", "down_proj"], modules_to_save=["lm_head"])
    report = mora.wrap(model, cfg)
    assert report.tied
    perturb(model)
    want = logits(model, ids)
    out = mora.export(model, cfg, tmp_path / "ad", base_model_name_or_path="tiny-gemma")
    meta, tensors = native_format.load_native(out, "mora")
    assert meta["config"]["type"] == "sharing" and meta["base_model_name_or_path"] == "tiny-gemma"
    assert set(meta["modules"]) == set(report.replaced)
    assert all(k.endswith(".mora_M") for k in tensors if "layers" in k)
    back = make("gemma")
    mora.load(back, out)
    torch.testing.assert_close(logits(back, ids), want, atol=0, rtol=0)
    mora.merge(back)
    back.save_pretrained(tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(plain, ids), want, atol=1e-5, rtol=0)


def test_bf16_base_keeps_fp32_M():
    lin = nn.Linear(32, 48).to(torch.bfloat16)
    m = mora.MoraLinear(lin, 16, "sharing")
    assert m.mora_M.dtype == torch.float32
    with torch.no_grad():
        m.mora_M.normal_()
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    assert m(x).dtype == torch.bfloat16
    assert m.unwrap().weight.dtype == torch.bfloat16


def test_config_validation_and_errors(tmp_path):
    assert mora.MoraConfig(type=6).type == "rotation" and mora.MoraConfig(type=4).type == "sharing_interleave"
    with pytest.raises(ValidationError):
        mora.MoraConfig(type=5)
    with pytest.raises(ValidationError):
        mora.MoraConfig(type="spiral")
    with pytest.raises(TunelabError, match="even"):
        mora.MoraLinear(nn.Linear(8, 8), 5, "rotation")
    with pytest.raises(TunelabError, match="matches no module"):
        mora.wrap(make(), {"target_modules": ["nope_proj"]})
    with pytest.raises(TunelabError, match="not a tunelab mora adapter"):
        mora.load(make(), tmp_path)
