"""Objectives describe themselves: an objective registered from outside the package — its own options class, its
own config section, its `from_config` — is validated by the run config schema and trains end to end, with no
file under src/tunelab touched. The registry is the one list of objective names."""

import json
import sys
from pathlib import Path

import pytest
from pydantic import Field

from tunelab.config import Strict
from tunelab.errors import TunelabError
from tunelab.objectives import (OBJECTIVES, build_objective, load_run_config, objective_class, objective_names,
                                register, run_config_schema, unregister)
from tunelab.objectives.sft import SFT
from tunelab.train.launch import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import alpaca_rows, train_losses, write_config, write_jsonl  # noqa: E402


class ToyOptions(Strict):
    scale: float = Field(1.0, gt=0)  # the SFT loss times this
    tag: str = "plain"


class ScaledSFT(SFT):
    """SFT with its loss multiplied by ``toy_scaled_sft.scale``: a toy, to exercise the registry's contract."""

    name = "toy_scaled_sft"
    Options = ToyOptions

    def __init__(self, chunk_size: int, scale: float, tag: str):
        super().__init__(chunk_size)
        self.scale, self.tag = scale, tag

    @classmethod
    def from_config(cls, cfg, reference=None):
        o = cls.options(cfg)
        return cls(cfg.train.loss_chunk_size, o.scale, o.tag)

    def loss(self, model, batch):
        loss_sum, n, metrics = super().loss(model, batch)
        return self.scale * loss_sum, n, {**metrics, "toy_scale": self.scale}


@pytest.fixture
def toy():
    register(ScaledSFT)
    yield ScaledSFT
    unregister(ScaledSFT.name)


def _config(tmp_path, tiny_dir, name, **sections):
    data = write_jsonl(tmp_path / "sft.jsonl", alpaca_rows(12))
    return write_config(tmp_path / f"{name}.yaml", output_dir=str(tmp_path / name), method="full",
                        model={"name": str(tiny_dir)}, data={"train": str(data), "max_length": 64,
                                                             "eval_fraction": 0.0},
                        train={"max_steps": 2, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0},
                        samples={"n_heldout": 0}, **sections)


def test_a_registered_objective_trains_end_to_end(toy, tiny_dir, tmp_path):
    runs = {}
    for scale in (1.0, 0.5):
        path = _config(tmp_path, tiny_dir, f"toy{scale}", objective="toy_scaled_sft",
                       toy_scaled_sft={"scale": scale, "tag": "x"})
        cfg = load_run_config(path)
        assert isinstance(build_objective(cfg), ScaledSFT) and cfg.toy_scaled_sft.scale == scale
        runs[scale] = train(cfg)
    out = runs[0.5]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["toy_scale"] for r in rows if "toy_scale" in r] == [0.5, 0.5]
    assert json.loads((out / "results.json").read_text())["steps"] == 2
    saved = load_run_config(out / "config.yaml")  # the resolved config round-trips with the toy's section
    assert saved.objective == "toy_scaled_sft" and saved.toy_scaled_sft.tag == "x"
    # step 1's loss is computed before any update, from the same seed and data: the option scaled it
    (_, full), (_, half) = train_losses(runs[1.0])[0], train_losses(out)[0]
    assert half == pytest.approx(0.5 * full, rel=1e-4)


def test_the_toys_section_is_validated_like_any_other(toy, tmp_path):
    with pytest.raises(TunelabError) as e:
        load_run_config(None, ["objective=toy_scaled_sft", "toy_scaled_sft.scal=2"])
    assert str(e.value) == "override: toy_scaled_sft.scal: unknown key (did you mean toy_scaled_sft.scale?)"
    with pytest.raises(TunelabError) as e:
        load_run_config(None, ["toy_scaled_sft.scale=0"])
    assert str(e.value).startswith("override: toy_scaled_sft.scale: Input should be greater than 0")


def test_unregistered_names_are_refused_in_one_line(tmp_path):
    assert "toy_scaled_sft" not in objective_names()
    path = write_config(tmp_path / "c.yaml", output_dir="runs/x", objective="toy_scaled_sft")
    with pytest.raises(TunelabError) as e:
        load_run_config(path)
    assert str(e.value).startswith(f"{path}:2: objective: unknown objective; choose from sft, dpo,")
    assert "toy_scaled_sft: unknown key" in _error(["toy_scaled_sft.scale=2"])
    with pytest.raises(TunelabError, match="unknown objective 'toy_scaled_sft'"):
        objective_class("toy_scaled_sft")
    assert _error(["method=lorra"]) == "override: method: unknown method; choose from dora, freeze, full, lora, " \
        "loreft, mora, qlora (got 'lorra')"


def _error(overrides) -> str:
    with pytest.raises(TunelabError) as e:
        load_run_config(None, overrides)
    return str(e.value)


def test_the_registry_is_the_one_list_of_names():
    schema = run_config_schema()
    assert schema.OBJECTIVE_NAMES == tuple(objective_names())
    for name in objective_names():
        cls = OBJECTIVES[name]
        assert cls.name == name
        if cls.Options is not None:  # its section, named like it, holding its options class with its defaults
            assert schema.model_fields[name].annotation is cls.Options
        cfg = schema(objective=name)
        assert type(build_objective(cfg)) is cls  # from_config alone builds it: no ladder
    assert schema().grpo.kl_estimator == "k3" and schema().ppo.kl_estimator == "k1"  # each its own default
    assert (schema().dpo.beta, schema().simpo.beta, schema().orpo.beta, schema().kto.beta) == (0.1, 2.0, 0.1, 0.1)


def test_related_objectives_share_options_by_subclassing():
    from tunelab.objectives.dpo import DPOOptions
    from tunelab.objectives.grpo import ClipOptions, GRPOOptions

    assert issubclass(OBJECTIVES["online_dpo"].Options, DPOOptions)
    assert issubclass(OBJECTIVES["rloo"].Options, GRPOOptions)
    assert issubclass(OBJECTIVES["ppo"].Options, ClipOptions) and not issubclass(OBJECTIVES["ppo"].Options,
                                                                                 GRPOOptions)
    assert "advantage" not in OBJECTIVES["ppo"].Options.model_fields  # GAE: no estimator to pick


def test_an_objective_section_cannot_shadow_a_shared_one():
    class Clash(SFT):
        name = "train"
        Options = ToyOptions

    register(Clash)
    try:
        with pytest.raises(TunelabError, match="would replace the shared `train:` section"):
            run_config_schema()
    finally:
        unregister("train")
