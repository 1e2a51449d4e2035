"""The adapter interface a run calls by method name: `full` as a method module, apply/check/export/load_method,
saves_full_model, the generic per-batch hook (`batch_context`, LoReFT's positions), and the import rules
(objectives/eval never import a specific method; adapters/ never import what calls them)."""

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from adapter_helpers import batch, logits, make, perturb
from pydantic import ValidationError

from tunelab.adapters import base, full, get_method, loreft, loreft_positions, partial
from tunelab.errors import TunelabError
from tunelab.objectives.sft import SFT

SRC = Path(__file__).resolve().parents[2] / "src" / "tunelab"


# ------------------------------------------------------------------------------------------------- full
@pytest.mark.parametrize("arch", ["llama", "gemma"])  # gemma: tied embed/lm_head, counted once
def test_full_wraps_like_before(arch):
    model = make(arch)
    for p in model.parameters():
        p.requires_grad_(False)
    n = sum(p.numel() for p in model.parameters())  # what train/run.py's `full` branch reported
    report = base.apply_method(model, "full", None)
    assert (report.method, report.replaced, report.trainable, report.total) == ("full", [], n, n)
    assert all(p.requires_grad for p in model.parameters())
    assert report.summary() == f"full: 0 modules, trainable {n:,} / {n:,} (100.00%)"
    assert get_method("full") is full and not base.has_adapter(model)
    ids = batch()
    want = logits(model, ids)
    assert full.merge(model) == [] and base.merge(model) == []  # a no-op
    torch.testing.assert_close(logits(model, ids), want, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="no adapter"):  # the reference of a full run is a frozen copy
        with full.disabled(model):
            pass
    with pytest.raises(ValidationError, match="extra"):
        full.wrap(make(arch), {"r": 8})


def test_full_export_load_roundtrip(tmp_path):
    model = make("gemma")
    base.apply_method(model, "full", None)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    ids = batch()
    want = logits(model, ids)
    out = base.export_method(model, "full", None, tmp_path / "model", base_model_name_or_path="tiny")
    assert (out / "config.json").is_file()
    back = make("gemma")
    report = base.load_method(back, "full", out)
    assert report.trainable == report.total
    torch.testing.assert_close(logits(back, ids), want, atol=0, rtol=0)
    with pytest.raises(TunelabError, match="not a Hugging Face model folder"):
        base.load_method(make("gemma"), "full", tmp_path)


def test_run_facing_helpers_need_no_method_names(tmp_path):
    assert [m for m in base.method_names() if base.saves_full_model(m)] == ["freeze", "full", "partial"]
    model = make("llama")
    report = base.apply_method(model, "lora", {"r": 4, "target_modules": ["q_proj"]})
    assert report.method == "lora" and len(report.replaced) == 2
    perturb(model)
    ids = batch()
    base.export_method(model, "lora", {"r": 4}, tmp_path / "ad", base_model_name_or_path="tiny")
    assert (tmp_path / "ad" / "adapter_config.json").is_file()  # PEFT's format for lora
    back = make("llama")
    base.load_method(back, "lora", tmp_path / "ad")
    torch.testing.assert_close(logits(back, ids), logits(model, ids), atol=0, rtol=0)
    base.check_method_data("lora", [])  # lora has no check_examples: nothing to refuse
    with pytest.raises(TunelabError, match="unknown"):
        base.apply_method(make("llama"), "lorax", None)
    for name in base.method_names():  # the uniform interface of every method module
        mod = get_method(name)
        for attr in ("Config", "wrap", "merge", "export", "load", "adapter_state_dict", "load_adapter_state_dict",
                     "set_enabled", "disabled"):
            assert callable(getattr(mod, attr)), (name, attr)
        assert not hasattr(mod, "export_peft") and not hasattr(mod, "load_peft") and not hasattr(mod, "wrap_objective")


# --------------------------------------------------------------------------------------- batch_context
def sft_batch(ids, prompt_len):
    B, T = ids.shape
    loss = torch.zeros(B, T, dtype=torch.bool)
    loss[:, prompt_len:] = True
    prompt = torch.zeros(B, T, dtype=torch.bool)
    prompt[:, :prompt_len] = True
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": loss, "prompt_mask": prompt,
            "position_ids": torch.arange(T).expand(B, T), "seq_ids": torch.zeros_like(ids)}


def manual_nll(lg, b):
    """Σ −log p(target) over loss tokens from full logits (token t predicted at t−1), and the token count."""
    mask = b["loss_mask"][:, 1:]
    lp = F.log_softmax(lg[:, :-1].float(), -1).gather(-1, b["input_ids"][:, 1:, None])[..., 0]
    return -(lp * mask).sum(), mask.sum()


def test_batch_context_gives_loreft_the_batch_positions():
    ids = batch(t=12)
    model = make("llama")
    loreft.wrap(model, {"r": 4, "positions": "f2+l3"})
    perturb(model, scale=0.5)
    b = sft_batch(ids, prompt_len=8)
    # the old path: positions set explicitly by LoReFT's own function, scored on full logits
    with torch.no_grad(), loreft.batch_context(model, b):
        old_sum, old_n = manual_nll(model(input_ids=ids, position_ids=b["position_ids"]).logits, b)
    with torch.no_grad():
        auto_sum, _ = manual_nll(model(input_ids=ids).logits, b)  # no batch: the whole input taken as the prompt
        seen = []
        hook = model.model.register_forward_hook(lambda m, a, o: seen.append(loreft._state(model).current))
        try:
            new_sum, new_n, _ = SFT().loss(model, b)  # objectives.logprobs → adapters.base.batch_context
        finally:
            hook.remove()
    assert int(new_n) == int(old_n)
    torch.testing.assert_close(new_sum, old_sum, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(auto_sum, old_sum, atol=1e-3)  # the positions do matter
    want = loreft_positions.prompt_locations(b["seq_ids"], b["prompt_mask"], 2, 3)
    assert len(seen) == 1 and seen[0].equal(want)
    assert want[0].nonzero().flatten().tolist() == [0, 1, 5, 6, 7]


def test_batch_context_is_a_noop_without_a_hook():
    model = make("llama")
    b = sft_batch(batch(t=8), 4)
    assert base._batch_hooks(model) == []
    with base.batch_context(model, b) as m:
        assert m is model
    partial.wrap(model, {"layers": 1})  # FullyTrained layers: freeze has no per-batch hook
    assert base._batch_hooks(model) == []
    model = make("llama")
    loreft.wrap(model, {"r": 2})
    assert base._batch_hooks(model) == [loreft.batch_context]
    with base.batch_context(model, b):
        assert loreft._state(model).explicit  # set inside,
    assert not loreft._state(model).explicit  # restored after


# ------------------------------------------------------------------------------------------ import rules
def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(absolute module, imported names) of every import in `path` (relative ones resolved)."""
    pkg = ".".join(path.relative_to(SRC.parent).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                parts = pkg.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                mod = f"{parent}.{mod}" if mod else parent
            out.append((mod, [a.name for a in node.names]))
    return out


def test_objectives_and_eval_never_import_a_specific_method():
    methods = {m.rsplit(".", 1)[1] for m in base._METHODS.values()} | {"loreft_positions", "nf4", "extras"}
    bad = []
    for folder in ("objectives", "eval"):
        for path in sorted((SRC / folder).rglob("*.py")):
            for mod, names in _imports(path):
                if not mod.startswith("tunelab.adapters"):
                    continue
                if mod not in ("tunelab.adapters", "tunelab.adapters.base") or set(names) & methods:
                    bad.append(f"{path.relative_to(SRC)}: {mod} {names}")
    assert not bad, bad


def test_adapters_import_nothing_that_calls_them():
    allowed = ("tunelab.adapters", "tunelab.errors", "tunelab.models.load")
    bad = [f"{p.name}: {mod}" for p in sorted((SRC / "adapters").glob("*.py"))
           for mod, _ in _imports(p) if mod.startswith("tunelab") and not mod.startswith(allowed)]
    assert not bad, bad
