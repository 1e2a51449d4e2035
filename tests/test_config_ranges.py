"""Every numeric option has a range: a value outside it is one line naming the key, never a silent misbehaviour
(a negative `train.max_grad_norm` used to flip every gradient)."""

import typing

import pytest
from pydantic import BaseModel

from tunelab.objectives import load_run_config as load_config, run_config_schema
from tunelab.errors import TunelabError

# numbers whose every finite value is meaningful
UNBOUNDED = {"rejection_sampling.keep_threshold"}  # a reward threshold: rewards may be negative

BAD = {
    "train.max_grad_norm": [-1.0, 0],
    "train.lr": [0, -1e-4, ".nan", ".inf"],
    "train.batch_size": [0],
    "train.grad_accum": [0],
    "train.weight_decay": [-0.1],
    "train.betas": ["[0.9, 1.0]", "[-0.1, 0.99]"],
    "train.warmup_ratio": [1.5],
    "train.min_lr_ratio": [-0.1],
    "train.seed": [-1, 2**64],
    "train.epochs": [0],
    "train.keep_last": [0],
    "data.eval_fraction": [1.0, -0.1],
    "data.max_length": [0],
    "lora.dropout": [1.0, -0.1],
    "lora.alpha": [0],
    "lora.r": [0],
    "lora.rank_pattern": ["{q_proj: 0}"],
    "lora.alpha_pattern": ["{q_proj: -1}"],
    "mora.r_hat": [0],
    "qlora.block_size": [1],
    "rl.temperature": [0, -1],
    "rl.top_p": [0, 1.5],
    "grpo.epsilon": [0, 1.0],
    "ppo.epsilon": [0, 1.0],
    "rl.group_size": [0],
    "grpo.beta": [-0.1],
    "dpo.beta": [0],
    "dpo.label_smoothing": [0.5],
    "reference.sync_alpha": [0, 1.5],
    "samples.max_new_tokens": [0],
    "eval.limit": [0],
    "freeze.layers": [-1],
}


@pytest.mark.parametrize("key,value", [(k, v) for k, vs in BAD.items() for v in vs])
def test_out_of_range_values_are_one_line_naming_the_key(key, value):
    with pytest.raises(TunelabError) as e:
        load_config(None, [f"{key}={value}"])
    msg = str(e.value)
    assert msg.startswith(f"override: {key}") and "\n" not in msg


def test_the_limits_themselves_are_accepted():
    cfg = load_config(None, ["train.max_grad_norm=null", "data.eval_fraction=0", "lora.dropout=0", "rl.top_p=1",
                             "train.warmup_ratio=1", "reference.sync_alpha=1", "train.betas=[0, 0.999]"])
    assert cfg.train.max_grad_norm is None and cfg.rl.top_p == 1


def _numeric_fields(model: type[BaseModel], prefix=""):
    for name, field in model.model_fields.items():
        ann = field.annotation
        args = [a for a in typing.get_args(ann) if a is not type(None)] or [ann]
        for a in args:
            meta = list(field.metadata)
            if typing.get_origin(a) is typing.Annotated:  # e.g. NonNegativeInt inside a union
                a, meta = typing.get_args(a)[0], meta + [c for m in a.__metadata__ for c in getattr(m, "metadata", [m])]
            if isinstance(a, type) and issubclass(a, BaseModel):
                yield from _numeric_fields(a, f"{prefix}{name}.")
            elif a in (int, float) and not isinstance(field.default, bool):
                yield f"{prefix}{name}", meta


def test_every_numeric_option_has_a_range():
    """A new numeric option without bounds fails here (add them, or list it in UNBOUNDED with the reason)."""
    open_ended = []
    for key, meta in _numeric_fields(run_config_schema()):
        bounded = any(getattr(m, attr, None) is not None for m in meta for attr in ("ge", "gt", "le", "lt"))
        if not bounded and key not in UNBOUNDED:
            open_ended.append(key)
    assert not open_ended, f"numeric options without a range: {open_ended}"
