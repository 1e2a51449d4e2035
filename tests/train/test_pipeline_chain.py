"""Pipelines whose data chains: the two Llama-3 recipes (examples/llama3_pipeline.yaml — SFT → rejection sampling →
PPO → DPO — and examples/llama3_iterative.yaml — rounds of reward model → rejection sampling → SFT → DPO) run end
to end on a tiny random model with the examples' own stages, names and references (only sizes shrunk and the
verifier swapped for a score a random model can vary), and every stage's inputs are an earlier stage's outputs:
pair files sampled from the previous policy (``source_policy``), the reward model trained on the generated file,
PPO and the data stages scored by that reward model. A reference to a later, unknown or unwritten output is
refused before anything runs, with the config file's line."""

import json
from pathlib import Path

import pytest
import yaml

from tests.helpers import save_tiny_model, write_jsonl
from tunelab.cli import main
from tunelab.config import ASSETS
from tunelab.errors import TunelabError
from tunelab.objectives import load_run_config
from tunelab.rl.pair_data import GenerateOptions, select_pair, select_sft
from tunelab.train.launch import train
from tunelab.train.pipeline import resolve_stages

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
REWARDS = "chain_rewards"  # a user reward module written by the fixture
REWARD_SOURCE = '''
def varied(batch):
    """A deterministic score in [0, 2] that differs between texts (a tiny random model never answers right)."""
    return [(sum(map(ord, t)) % 101) / 50 for t in batch.completions]
'''


@pytest.fixture
def model(tmp_path, tokenizer, monkeypatch) -> Path:
    """A tiny random model's folder; the `chain_rewards:varied` reward importable."""
    (tmp_path / "rewards").mkdir()
    (tmp_path / "rewards" / f"{REWARDS}.py").write_text(REWARD_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path / "rewards"))
    return save_tiny_model(tmp_path / "tiny", tokenizer)


@pytest.fixture
def shrink(tmp_path, model):
    """An example config at test size: its stages, names, `from:`s and references untouched."""

    def rewards(specs):
        return [{"name": f"{REWARDS}:varied", "weight": s.get("weight", 1.0)} if s["name"] == "exact_match" else s
                for s in specs]

    def small(section: dict, **values) -> dict:
        return {**section, **{k: v for k, v in values.items() if k in section}}

    def make(example: str) -> Path:
        raw = yaml.safe_load((EXAMPLES / example).read_text().replace("${ASSETS}", str(ASSETS)))
        raw.update(output_dir=str(tmp_path / "pipe"), model={"name": str(model)},
                   eval={}, samples={"n_heldout": 0})
        raw["data"].update(max_length=64)
        raw["train"].update(max_steps=1, batch_size=2)
        raw["rl"].update(max_new_tokens=6, eval_prompts=0, group_size=2, prompts_per_step=2,
                         rewards=rewards(raw["rl"]["rewards"]))
        for st in raw["stages"]:
            if "train" in st:
                st["train"] = small(st["train"], max_steps=1, batch_size=2)
            if "rl" in st:
                st["rl"] = small(st["rl"], group_size=2, prompts_per_step=2, ppo_epochs=1)
                st["rl"]["rewards"] = rewards(st["rl"].get("rewards", raw["rl"]["rewards"]))
            if "generate" in st:
                st["data"]["limit"] = 6
        path = tmp_path / example
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    return make


def _config(root: Path, stage: str):
    return load_run_config(root / stage / "config.yaml")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_pairs(path: Path, policy: Path, stage: str) -> list[dict]:
    rows = _rows(path)
    assert rows
    for r in rows:
        assert r["source_policy"] == str(policy) and r["source_stage"] == stage
        assert r["chosen_score"] > r["rejected_score"] and r["chosen"] != r["rejected"]
        assert max(r["scores"]) == pytest.approx(r["chosen_score"]) and min(r["scores"]) == pytest.approx(
            r["rejected_score"])
    return rows


def test_blog_recipe_each_stage_consumes_the_one_before(shrink, tmp_path, monkeypatch):
    path = shrink("llama3_pipeline.yaml")
    root = tmp_path / "pipe"
    train(load_run_config(path), source=path)

    assert _config(root, "sft").model.name == str(tmp_path / "tiny")
    # the reward model's pairs: sampled from the SFT policy, labelled by the verifier
    pairs = _assert_pairs(root / "rm_pairs" / "pairs.jsonl", root / "sft" / "merged", "sft")
    data = json.loads((root / "rm_pairs" / "data.json").read_text())
    assert data["source_policy"] == str(root / "sft" / "merged") and data["pairs"] == len(pairs)
    assert data["prompts"] == 6 and data["pairs"] + data["tied_groups"] + data["identical_groups"] == 6
    rm = _config(root, "rm")
    assert rm.data.train == str(root / "rm_pairs" / "pairs.jsonl") and rm.model.name == str(root / "sft" / "merged")
    # rejection sampling and PPO scored by that reward model; PPO's value model starts as it
    rs, ppo = _config(root, "rs"), _config(root, "ppo")
    assert rs.model.name == str(root / "sft" / "merged") and rs.rl.rewards[0]["run_dir"] == str(root / "rm")
    assert ppo.model.name == str(root / "rs" / "merged") and ppo.rl.rewards[0]["run_dir"] == str(root / "rm")
    assert ppo.ppo.value_init == str(root / "rm") and ppo.ppo.value_model == "copy"
    # DPO's pairs: sampled from the PPO policy, ranked by the reward model; DPO starts from the PPO policy
    _assert_pairs(root / "dpo_pairs" / "pairs.jsonl", root / "ppo" / "merged", "ppo")
    assert json.loads((root / "dpo_pairs" / "data.json").read_text())["rewards"][0]["run_dir"] == str(root / "rm")
    dpo = _config(root, "dpo")
    assert dpo.data.train == str(root / "dpo_pairs" / "pairs.jsonl") and dpo.model.name == str(root / "ppo" / "merged")

    summary = json.loads((root / "results.json").read_text())
    assert [(s["name"], s["objective"]) for s in summary["stages"]] == [
        ("sft", "sft"), ("rm_pairs", "generate"), ("rm", "reward"), ("rs", "rejection_sampling"), ("ppo", "ppo"),
        ("dpo_pairs", "generate"), ("dpo", "dpo")]
    assert summary["stages"][1]["pairs"] == len(pairs) and summary["stages"][1]["from"] == "sft"

    # a rerun reuses every stage, the data stages' files included: nothing sampled or trained again
    import tunelab.train.pipeline as pipeline_mod

    def ran(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(pipeline_mod.stage_data, "run_data_stage", ran)
    monkeypatch.setattr(pipeline_mod.single_run, "run", ran)
    before = (root / "dpo_pairs" / "pairs.jsonl").read_bytes()
    train(load_run_config(path), source=path)
    assert (root / "dpo_pairs" / "pairs.jsonl").read_bytes() == before


def test_iterative_recipe_rounds_consume_the_previous_round(shrink, tmp_path):
    path = shrink("llama3_iterative.yaml")
    root = tmp_path / "pipe"
    train(load_run_config(path), source=path)
    tiny = str(tmp_path / "tiny")

    r1 = _assert_pairs(root / "r1_rm_pairs" / "pairs.jsonl", tiny, None)
    for k, policy in (("r1", tiny), ("r2", str(root / "r1_dpo" / "merged"))):
        rm = _config(root, f"{k}_rm")  # the reward model: on the pre-trained checkpoint, on this round's pairs
        assert rm.model.name == tiny and rm.data.train == str(root / f"{k}_rm_pairs" / "pairs.jsonl")
        # rejection sampling from the latest policy, scored by this round's reward model
        data = json.loads((root / f"{k}_rs" / "data.json").read_text())
        assert data["source_policy"] == policy and data["rewards"][0]["run_dir"] == str(root / f"{k}_rm")
        sft_rows = _rows(root / f"{k}_rs" / "sft.jsonl")
        assert len(sft_rows) == data["prompts"] == 6  # best of K per prompt, no threshold
        assert all(r["source_policy"] == policy and r["score"] == pytest.approx(max(r["scores"])) for r in sft_rows)
        _assert_pairs(root / f"{k}_rs" / "pairs.jsonl", Path(policy), None if k == "r1" else "r1_dpo")
        sft, dpo = _config(root, f"{k}_sft"), _config(root, f"{k}_dpo")
        assert sft.model.name == tiny and sft.data.train == str(root / f"{k}_rs" / "sft.jsonl")
        assert dpo.model.name == str(root / f"{k}_sft" / "merged")
        assert dpo.data.train == str(root / f"{k}_rs" / "pairs.jsonl")
    # round 2's reward model trains on every pair so far: round 1's first, then its own from the round-1 policy
    r2 = _rows(root / "r2_rm_pairs" / "pairs.jsonl")
    assert r2[:len(r1)] == r1 and len(r2) > len(r1)
    assert all(r["source_policy"] == str(root / "r1_dpo" / "merged") for r in r2[len(r1):])


def _pipeline(tmp_path, stages: list[dict]) -> Path:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Say a.", "answer": "a"}])
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "pipe"), "model": {"name": "smollm2-135m"},
                                    "data": {"train": str(prompts)}, "stages": stages}, sort_keys=False))
    return path


GEN = {"name": "pairs", "generate": {"pairs": True}}
RM = {"name": "rm", "objective": "reward", "data": {"train": "${STAGE:pairs}/pairs.jsonl"}}


SFT = {"name": "sft", "objective": "sft"}


@pytest.mark.parametrize("stages, line, message", [
    ([RM, GEN], 10, r"stages\[0\] \(rm\): data.train: \$\{STAGE:pairs\}: stage 'pairs' comes later"),
    ([GEN, {**RM, "data": {"train": "${STAGE:pairz}/pairs.jsonl"}}], 13,
     r"stages\[1\] \(rm\): data.train: \$\{STAGE:pairz\}: no stage named 'pairz' \(stages: pairs, rm\)"),
    ([GEN, {**RM, "data": {"train": "${STAGE:pairs}/sft.jsonl"}}], 13,
     r"\$\{STAGE:pairs\}/sft.jsonl: stage 'pairs' writes \$\{STAGE:pairs\}/pairs.jsonl$"),
    ([SFT, {"name": "ppo", "objective": "ppo",
            "rl": {"rewards": [{"name": "reward_model", "run_dir": "${STAGE:sft}"}]}}], 14,
     r"stages\[1\] \(ppo\): rl.rewards.0.run_dir: \$\{STAGE:sft\}: needs a reward-model stage"),
    ([SFT, {**GEN, "from": "rm"}], 12, r"stages\[1\] \(pairs\): from: 'rm' is not an earlier policy"),
    ([{**GEN, "generate": {"pairs": True, "sft": True}}], 7, r"generate.sft_threshold: set it"),
    ([{**GEN, "generate": {"pairz": True}}], 9, r"stages\[0\] \(pairs\): generate.pairz: unknown key"),
    ([{**GEN, "rl": {"rewards": [{"name": "exact_match", "extrct": "last_number"}]}}], 7,
     r"stages\[0\] \(pairs\): reward 'exact_match': unknown option 'extrct'"),
    ([SFT, {"name": "rm", "objective": "reward"}, {**GEN, "rl": {"rewards": [
        {"name": "reward_model", "run_dir": "${STAGE:rm}", "devise": "cpu"}]}}], 11,
     r"stages\[2\] \(pairs\): reward 'reward_model': unknown option 'devise' \(options: run_dir, device\)"),
    ([SFT, {"name": "rm", "objective": "reward", "from": "base"}, {"name": "ppo", "objective": "ppo",
                                                                   "ppo": {"value_init": "${STAGE:rm}"}}], 15,
     r"stages\[2\] \(ppo\): ppo.value_init: the reward model 'rm' trained from the base model, this policy from "
     r"sft: .* \(use ppo.value_model: copy\)"),
])
def test_a_wrong_reference_is_one_line_with_its_file_line(tmp_path, stages, line, message):
    path = _pipeline(tmp_path, stages)
    with pytest.raises(TunelabError, match=message) as e:
        resolve_stages(load_run_config(path), path)
    assert str(e.value).startswith(f"{path}:{line}: ")
    assert "\n" not in str(e.value) and not (tmp_path / "pipe").exists()


def test_the_cli_refuses_a_later_stage_before_anything_runs(tmp_path, capsys):
    path = _pipeline(tmp_path, [RM, GEN])
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}:10: stages[0] (rm)") and "comes later" in err and "\n" not in err
    assert not (tmp_path / "pipe").exists()


def test_pair_and_sft_selection():
    texts = ["a", "b", "c", "d"]
    assert select_pair([0.5, 1.0, 0.0, 1.0], texts) == (1, 2)  # first highest, first lowest
    assert select_pair([1.0, 1.0, 1.0, 1.0], texts) == "tied"  # no preference: skipped, counted
    assert select_pair([0.2, 0.25], texts[:2], margin=0.1) == "tied"
    assert select_pair([1.0, 0.0], ["x", "x"]) == "identical"
    assert select_sft([0.0, 0.0, 0.0], "best", 1.0) == []  # a group that is all wrong keeps nothing
    assert select_sft([0.0, 1.0, 1.0], "best", 1.0) == [1] and select_sft([0.0, 1.0, 1.0], "all", 1.0) == [1, 2]
    assert select_sft([-3.0, -1.0, -2.0], "best", None) == [1]  # no threshold: the best of K
    assert GenerateOptions().files() == ["pairs.jsonl"]
    assert GenerateOptions(sft=True).files() == ["pairs.jsonl", "sft.jsonl"]


def _data_stage(tmp_path, model, out: str, reward: dict) -> Path:
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / out), "model": {"name": str(model)},
        "data": {"train": str(ASSETS / "data" / "arith_rl.jsonl"), "limit": 6, "max_length": 64},
        "rl": {"group_size": 3, "prompts_per_step": 4, "max_new_tokens": 6, "rewards": [reward]},
        "stages": [{"name": "pairs", "generate": {"pairs": True, "sft": True, "sft_keep": "all",
                                                  "sft_threshold": 1.0}}]}, sort_keys=False))
    return path


def test_a_data_stage_is_deterministic_and_counts_what_it_kept(tmp_path, model):
    varied = {"name": f"{REWARDS}:varied"}
    for out in ("a", "b"):
        path = _data_stage(tmp_path, model, out, varied)
        train(load_run_config(path), source=path)
    a, b = (tmp_path / "a" / "pairs", tmp_path / "b" / "pairs")
    assert (a / "pairs.jsonl").read_bytes() == (b / "pairs.jsonl").read_bytes()  # same seed, same data
    assert (a / "sft.jsonl").read_bytes() == (b / "sft.jsonl").read_bytes()
    data = json.loads((a / "data.json").read_text())
    sft = _rows(a / "sft.jsonl")
    assert data["prompts"] == 6 and data["samples"] == 18 and data["sft_kept"] == len(sft)
    assert data["pairs"] == 6 and data["tied_groups"] == data["identical_groups"] == 0  # no tie among these
    # every sample at or above the threshold, and only those (sft_keep: all)
    scores = [s for r in _rows(a / "pairs.jsonl") for s in r["scores"]]
    assert sorted(r["score"] for r in sft) == sorted(s for s in scores if s >= 1.0) and 0 < len(sft) < 18
    assert data["source_policy"] == str(model) and data["reward_" + f"{REWARDS}:varied"] == pytest.approx(
        data["score_mean"])


def test_a_data_stage_that_finds_no_pair_stops_with_one_line_and_leaves_nothing(tmp_path, model):
    path = _data_stage(tmp_path, model, "flat", {"name": "format", "pattern": "never-matches"})  # every score 0
    with pytest.raises(TunelabError, match=r"^stage pairs: no pairs row from 6 prompts × 3 samples \(6 groups tied"):
        train(load_run_config(path), source=path)
    assert not (tmp_path / "flat").exists()


def test_overwrite_clears_a_data_stage_but_not_the_users_files(tmp_path):
    from tunelab.train.rundir import LOCK_FILE, claim_run_dir, clear_run_files

    root, stage = tmp_path / "pipe", tmp_path / "pipe" / "pairs"
    with claim_run_dir(root, False, False, kind="pipeline"):  # both folders marked as tunelab's, as a run marks them
        pass
    with claim_run_dir(stage, False, False):
        pass
    (root / "pipeline.yaml").write_text("stages: []\n")
    for name in (LOCK_FILE, "config.yaml", "data.json", "pairs.jsonl", "sft.jsonl", "notes.txt"):
        (stage / name).write_text("x")
    clear_run_files(root)
    assert sorted(p.name for p in stage.iterdir()) == ["notes.txt"]
