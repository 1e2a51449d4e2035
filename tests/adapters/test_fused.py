"""`train.fuse_projections` (adapters/fused.py): the frozen q,k,v and gate,up as one GEMM each give the unfused
logits and gradients of every trainable parameter (fp32, atol 1e-5), for LoRA, DoRA and QLoRA on tiny llama and
qwen2 (q,k,v with bias); merge, adapter state dict and PEFT export are identical; unfuse restores separate
weights; the loop fuses when asked and unfuses when done."""

import copy

import pytest
import torch

from tunelab.adapters import base, fused
from tunelab.adapters.base import apply_method

from adapter_helpers import batch, make, perturb

METHODS = {"lora": {"r": 4, "alpha": 8, "dropout": 0.0},
           "dora": {"r": 4, "alpha": 8, "dropout": 0.0},
           "qlora": {"r": 4, "alpha": 8, "dropout": 0.0, "block_size": 16, "double_quant": False}}


def _pair(arch, method):
    model = make(arch)
    apply_method(model, method, METHODS[method])
    perturb(model)
    twin = copy.deepcopy(model)
    groups, undo = fused.fuse_projections(twin)
    return model, twin, groups, undo


def _loss_and_grads(model, ids):
    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_fused_logits_and_gradients_equal_unfused(arch, method):
    model, twin, groups, _ = _pair(arch, method)
    n_layers = len(model.model.layers)
    assert len(groups) == 2 * n_layers  # q,k,v and gate,up in every decoder layer
    assert all(fused.is_fused(twin.get_submodule(f"model.layers.0.{p}"))
               for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"))
    ids = batch()
    calls = []
    orig = fused.FusedGroup._compute
    fused.FusedGroup._compute = lambda self, x, wb: calls.append(1) or orig(self, x, wb)
    try:
        logits_f, grads_f = _loss_and_grads(twin, ids)
    finally:
        fused.FusedGroup._compute = orig
    logits_u, grads_u = _loss_and_grads(model, ids)
    assert len(calls) == len(groups)  # one GEMM per group and forward: the siblings took their slices
    torch.testing.assert_close(logits_f, logits_u, atol=1e-5, rtol=1e-5)
    assert grads_f.keys() == grads_u.keys() and grads_f
    for name in grads_u:
        torch.testing.assert_close(grads_f[name], grads_u[name], atol=1e-5, rtol=1e-4, msg=name)
    if arch == "qwen2":
        assert twin.model.layers[0].self_attn.q_proj.bias is not None  # the biased q,k,v path was exercised


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_float_weights_are_views_of_one_tensor_until_unfused(method):
    _, twin, groups, undo = _pair("qwen2", method)
    g = groups[0]
    w_ptr = g.weight.untyped_storage().data_ptr()
    assert all(m.weight.untyped_storage().data_ptr() == w_ptr for m in g.layers)  # no weight held twice
    names_before = [n for n, _ in twin.named_parameters()]
    undo()
    ptrs = {m.weight.untyped_storage().data_ptr() for m in g.layers}
    assert len(ptrs) == len(g.layers)  # each its own storage again
    assert [n for n, _ in twin.named_parameters()] == names_before
    assert not any(fused.is_fused(m) for _, m in base.adapter_modules(twin))


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_state_dict_export_and_merge_are_identical(method, tmp_path):
    model, twin, _, undo = _pair("qwen2", method)
    _loss_and_grads(twin, batch())  # a fused forward/backward happened
    sd_u, sd_f = base.adapter_state_dict(model), base.adapter_state_dict(twin)
    assert list(sd_u) == list(sd_f)
    for k in sd_u:
        assert torch.equal(sd_u[k], sd_f[k]), k
    a, b = tmp_path / "unfused", tmp_path / "fused"
    base.export_method(model, method, METHODS[method], a)
    base.export_method(twin, method, METHODS[method], b)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    undo()
    base.merge(model)
    base.merge(twin)
    msd, tsd = model.state_dict(), twin.state_dict()
    assert list(msd) == list(tsd)
    for k in msd:
        assert torch.equal(msd[k], tsd[k]), k


def test_partial_targets_and_other_inputs_are_left_alone():
    """A set with a member outside target_modules is not fused; a later member called with an input the first
    was not called with computes its own slice only (nothing cached); DoRA with dropout is not fused."""
    model = make("llama")
    apply_method(model, "lora", {"r": 4, "target_modules": ["q_proj", "v_proj", "gate_proj", "up_proj"]})
    groups, _ = fused.fuse_projections(model)
    assert len(groups) == len(model.model.layers)  # gate,up only: q,k,v lacks k_proj's adapter
    assert [g.layers for g in groups] == [[layer.mlp.gate_proj, layer.mlp.up_proj] for layer in model.model.layers]
    mlp = model.model.layers[0].mlp
    x, other = torch.randn(2, 3, mlp.up_proj.in_features), torch.randn(2, 3, mlp.up_proj.in_features)
    calls = []
    orig = fused.FusedGroup._compute
    fused.FusedGroup._compute = lambda self, x, wb: calls.append(1) or orig(self, x, wb)
    try:
        with torch.no_grad():
            torch.testing.assert_close(mlp.gate_proj.base_forward(x), torch.nn.functional.linear(x, mlp.gate_proj.weight))
            assert groups[0].entries  # up's slice waits for it
            torch.testing.assert_close(mlp.up_proj.base_forward(x), torch.nn.functional.linear(x, mlp.up_proj.weight))
            assert not groups[0].entries  # taken out on use: nothing held
            torch.testing.assert_close(mlp.up_proj.base_forward(other),
                                       torch.nn.functional.linear(other, mlp.up_proj.weight))
            assert not groups[0].entries
    finally:
        fused.FusedGroup._compute = orig
    assert len(calls) == 1  # the one fused GEMM; `other` took up's own weight only
    dora = make("llama")
    apply_method(dora, "dora", {"r": 4, "dropout": 0.1})
    assert fused.fuse_projections(dora)[0] == []


@pytest.mark.parametrize("compute_dtype,memory_mode", [(None, False), ("bfloat16", False), (None, True)])
def test_loop_fuses_during_training_and_unfuses_after(tiny, tmp_path, compute_dtype, memory_mode):
    """Two SGD steps through the loop, fused vs not: same losses and adapters (fp32: 1e-5; under bf16 autocast,
    where one GEMM and three GEMMs may round differently: 1e-3 relative); in memory mode the checkpointed MLP's
    recomputation goes through the fused gate,up too."""
    from tunelab.config import TrainConfig
    from tunelab.data.batches import StaticBatches
    from tunelab.data.collate import collate
    from tunelab.data.masking import Encoded
    from tunelab.objectives.sft import SFT
    from tunelab.train.loop import fit

    g = torch.Generator().manual_seed(0)
    examples = [Encoded(ids, [False] * 3 + [True] * 9, False, 9)
                for ids in torch.randint(5, 900, (3, 12), generator=g).tolist()]
    batches = [collate(examples, pad_id=0)]
    results = {}
    for fuse in (False, True):
        model = tiny("qwen2", vocab_size=1000, layers=1)
        apply_method(model, "lora", {"r": 4, "alpha": 8})
        perturb(model)
        seen = []
        orig = fused.FusedGroup.base_forward
        fused.FusedGroup.base_forward = lambda self, *a, **k: seen.append(1) or orig(self, *a, **k)
        try:
            cfg = TrainConfig(max_steps=2, batch_size=3, optimizer="SGD", lr=0.5, max_grad_norm=None,
                              warmup_steps=0, scheduler="constant", fuse_projections=fuse, compute_dtype=compute_dtype,
                              memory_mode=memory_mode)
            res = fit(model, SFT(), StaticBatches(lambda e: batches, 1), cfg, tmp_path / f"f{fuse}")
        finally:
            fused.FusedGroup.base_forward = orig
        assert bool(seen) == fuse
        assert not any(fused.is_fused(m) for _, m in base.adapter_modules(model))  # unfused when the loop ends
        results[fuse] = (res.last_loss, base.adapter_state_dict(model))
    tol = 1e-5 if compute_dtype is None else 1e-3
    assert results[True][0] == pytest.approx(results[False][0], rel=tol)
    for k, v in results[False][1].items():
        torch.testing.assert_close(results[True][1][k], v, atol=tol, rtol=max(tol, 1e-4))


@pytest.mark.compile
def test_fused_projections_inside_compiled_layers(tiny, tmp_path):
    """`train.compile` + `train.fuse_projections`: the compiled layer calls the fused base (its identity cache
    included) and gives the eager unfused step's loss."""
    from tunelab.config import TrainConfig
    from tunelab.data.batches import StaticBatches
    from tunelab.data.collate import collate
    from tunelab.data.masking import Encoded
    from tunelab.objectives.sft import SFT
    from tunelab.train.loop import fit

    g = torch.Generator().manual_seed(0)
    examples = [Encoded(ids, [False] * 3 + [True] * 9, False, 9)
                for ids in torch.randint(5, 900, (3, 12), generator=g).tolist()]
    batches = [collate(examples, pad_id=0)]
    losses = []
    for on in (False, True):
        torch.manual_seed(0)
        model = tiny("llama", vocab_size=1000, layers=1)
        apply_method(model, "lora", {"r": 4, "alpha": 8})
        perturb(model)
        cfg = TrainConfig(max_steps=1, batch_size=3, optimizer="SGD", lr=0.5, max_grad_norm=None, warmup_steps=0,
                          scheduler="constant", fuse_projections=on, compile=on)
        losses.append(fit(model, SFT(), StaticBatches(lambda e: batches, 1), cfg, tmp_path / f"c{on}").last_loss)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
