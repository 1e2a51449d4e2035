"""Config typos: every validation error at once, one line each with its file:line, the key probably meant
suggested (from the schema: a close name in the section, the name other trainers use, or the key's real section),
exit status 2."""

import pytest

from tunelab.cli import main
from tunelab.config import RunConfig, load_config
from tunelab.config_errors import suggestion
from tunelab.errors import TunelabErrors


def test_every_error_is_reported_once_with_its_line_and_a_suggestion(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  name: x\nlora:\n  rank: 8\n  lora_alpha: 16\ntrain:\n  lrr: 1e-4\n"
                   "  batch_size: many\n  r: 3\nlorra: {r: 1}\nlearning_rate: 3\n")
    rc = main(["train", str(cfg), "train.epochs=-1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err == [f"error: {cfg}:4: lora.rank: unknown key (did you mean lora.r?)",
                   f"error: {cfg}:5: lora.lora_alpha: unknown key (did you mean lora.alpha?)",
                   f"error: {cfg}:7: train.lrr: unknown key (did you mean train.lr?)",
                   f"error: {cfg}:8: train.batch_size: Input should be a valid integer, unable to parse string as "
                   "an integer (got 'many')",
                   f"error: {cfg}:9: train.r: unknown key (did you mean lora.r?)",
                   f"error: {cfg}:10: lorra: unknown key (did you mean lora?)",
                   f"error: {cfg}:11: learning_rate: unknown key (did you mean train.lr?)",
                   "error: override: train.epochs: Input should be greater than 0 (got -1)"]


def test_the_errors_are_one_exception_whose_text_is_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora:\n  rank: 8\ntrain:\n  lrr: 1\n")
    with pytest.raises(TunelabErrors) as e:
        load_config(cfg)
    assert len(e.value.messages) == 2 and "\n" not in str(e.value)
    assert str(e.value) == "; ".join(e.value.messages)


@pytest.mark.parametrize("path, meant", [(("lora", "rank"), "lora.r"), (("train", "learning_rate"), "train.lr"),
                                         (("train", "num_epochs"), "train.epochs"), (("data", "max_len"), "data.max_length"),
                                         (("train", "gradient_accumulation_steps"), "train.grad_accum"),
                                         (("lr",), "train.lr"), (("trian",), "train"), (("lora", "zzz"), None),
                                         (("rl", "num_generations"), "rl.group_size")])
def test_suggestions(path, meant):
    assert suggestion(RunConfig, path) == meant


def test_a_union_field_is_one_line_not_one_per_member(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora:\n  target_modules: 5\n")
    rc = main(["train", str(cfg)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {cfg}:2: lora.target_modules: "), err


def test_a_pipeline_stage_reports_every_error_with_suggestions(tmp_path):
    from tunelab.train.pipeline import resolve_stages

    cfg = RunConfig.model_validate({"stages": [{"name": "sft", "objective": "sft"},
                                               {"name": "dpo", "objective": "dpo", "train": {"lrr": 1},
                                                "lora": {"rank": 4}}]})
    with pytest.raises(TunelabErrors) as e:
        resolve_stages(cfg)
    assert e.value.messages == ["stages[1] (dpo): lora.rank: unknown key (did you mean lora.r?)",
                                "stages[1] (dpo): train.lrr: unknown key (did you mean train.lr?)"]
