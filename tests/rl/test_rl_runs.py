"""Online RL runs end to end on a toy (grpo, rloo, rejection_sampling, online_dpo): a tiny random llama, prompt-only
records and a user reward ("module:function", written by these tests) paying the share of even token ids in a
completion. At the low sampling temperature used here (0.05) the random model's few top candidates per context
hold most of the probability mass, so 8 steps at lr 2e-3 take the sampled and the greedy (held-out) reward from
about 0.5 to 1.0 (checked over 10 model seeds × 2-3 train seeds).

Also: a run killed in the middle of a rollout round resumes onto the uninterrupted curve, rejection sampling's
selected.jsonl holds exactly the completions it should, and a broken reward is one line through the CLI."""

import json
import math
from pathlib import Path

import pytest

from tests.helpers import save_tiny_model, write_config, write_jsonl
from tunelab.cli import main
from tunelab.objectives import load_run_config
from tunelab.errors import TunelabError
from tunelab.train.launch import train

REWARDS = "tunelab_toy_rewards"  # the user reward module, written by the `toy` fixture
REWARD_SOURCE = '''
import json


def even_share(batch, log=None):
    """Share of the completion's token ids that are even; `log`: append every call's texts and scores there."""
    scores = [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in batch.completion_ids]
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"completions": list(batch.completions), "scores": scores}) + "\\n")
    return scores


def boom(batch):
    raise RuntimeError("boom")


def zero(batch):
    """Every completion wrong (a 0/1 verifiable reward on a prompt the policy never solves)."""
    return [0.0] * len(batch.completion_ids)
'''
EVEN = f"{REWARDS}:even_share"
P, G = 2, 4  # prompts per round, completions per prompt


def _timing(key: str) -> bool:
    """Wall-clock metrics (tokens_per_s, rollout_tokens_per_s, step_seconds): the only ones a rerun may change."""
    return key.endswith(("_per_s", "seconds"))


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("rl")
    model = save_tiny_model(root / "tiny", tokenizer)
    data = write_jsonl(root / "prompts.jsonl", [{"prompt": f"Say something about {w}.", "answer": "x"}
                                                for w in "abcdefghijklmnop"])  # 12 train, 4 held out
    (root / "rewards").mkdir()
    (root / "rewards" / f"{REWARDS}.py").write_text(REWARD_SOURCE)
    return root, model, data


@pytest.fixture
def config(toy, tmp_path, monkeypatch):
    """config(objective, name=..., method=..., rl={...}, train={...}) -> path of a config.yaml for the toy."""
    root, model, data = toy
    monkeypatch.syspath_prepend(str(root / "rewards"))

    def make(objective, *, name="run", method="full", rl=None, train=None, **sections):
        cfg = {"output_dir": str(tmp_path / name), "method": method, "objective": objective,
               "model": {"name": str(model)}, "data": {"train": str(data), "max_length": 64, "eval_fraction": 0.25},
               "train": {"max_steps": 8, "batch_size": 8, "lr": 2e-3, "warmup_steps": 0, "scheduler": "constant",
                         **(train or {})},
               "rl": {"group_size": G, "prompts_per_step": P, "max_new_tokens": 12, "temperature": 0.05,
                      "rewards": [{"name": EVEN}], "eval_prompts": 4, **(rl or {})},
               "samples": {"n_heldout": 0}, **sections}
        return write_config(tmp_path / f"{name}.yaml", **cfg)
    return make


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train_rows(run_dir) -> list[dict]:
    return [r for r in _rows(run_dir) if "loss" in r]


def _results(run_dir) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.parametrize("objective", ["grpo", "rloo"])
def test_policy_gradient_raises_the_heldout_reward(objective, config):
    out = train(load_run_config(config(objective)))
    res = _results(out)
    assert res["steps"] == 8 and math.isfinite(res["final_train_loss"])
    # greedy completions of the 4 held-out prompts, scored by the same reward, before vs after 8 steps
    assert res["reward_after"] > res["reward_before"] + 0.1, (res["reward_before"], res["reward_after"])
    assert res["after"][f"reward_{EVEN}"] == res["reward_after"]
    rows = _train_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 9))
    for r in rows:
        for key in ("reward", f"reward_{EVEN}", "reward_std", "completion_length", "truncated",
                    "rollout_tokens_per_s", "advantage_abs", "clip_fraction", "ratio"):
            assert math.isfinite(r[key]), (key, r)
        assert 0 < r["completion_length"] <= 12 and 0 <= r["truncated"] <= 1 and 0 <= r["clip_fraction"] <= 1
        assert "kl" not in r  # beta = 0: no KL term, no reference
    # one micro-batch per round, one pass: every step is on-policy, so the trainer's log-probs (at the sampling
    # temperature) must equal the sampler's π_old — ratio 1, nothing clipped
    assert all(r["ratio"] == pytest.approx(1.0, abs=1e-4) and r["clip_fraction"] == 0.0 for r in rows)
    assert [r["step"] for r in _rows(out) if "eval_reward" in r] == [8]


def test_killed_mid_round_resumes_exactly(config):
    # a round: P·G = 8 rows served for 2 passes in micro-batches of 4 → 4 steps per round; the checkpoint at
    # step 3 falls inside round 0 (its rollouts live in the checkpoint), round 1 is sampled by the resumed policy
    kw = {"rl": {"ppo_epochs": 2}, "train": {"max_steps": 6, "batch_size": 4, "save_every": 3}}
    whole = train(load_run_config(config("grpo", name="whole", **kw)))
    cfg = load_run_config(config("grpo", name="killed", **kw))
    out = train(cfg, stop_after=4)
    assert not (out / "results.json").exists()
    assert [r["step"] for r in _train_rows(out)] == [1, 2, 3, 4]
    ckpt = out / "checkpoints" / "step-000003"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003"]
    assert (ckpt / "source.safetensors").exists()
    state = json.loads((ckpt / "state.json").read_text())["loop"]
    assert state["micro"] == 3 and state["source"]["round"] == 0  # the middle of round 0

    train(cfg)  # resumes from step 3
    a, b = _rows(whole), _rows(out)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6, 6]  # + the final eval row
    assert [r["round"] for r in _train_rows(out)] == [0, 0, 0, 0, 1, 1]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in (k for k in ra if not _timing(k)):
            assert rb[k] == pytest.approx(ra[k], abs=1e-6, rel=0), (ra["step"], k)
    assert _results(out)["reward_after"] == _results(whole)["reward_after"]
    # the budget counts both invocations: rounds 0 and 1 sampled once each (round 0's rows came back with the
    # checkpoint), the same completions and tokens as the uninterrupted run
    bw, bk = _results(whole)["budget"], _results(out)["budget"]
    assert (bw["invocations"], bk["invocations"]) == (1, 2)
    assert bk["completions_sampled"] == bw["completions_sampled"] == 2 * P * G
    assert bk["tokens_sampled"] == bw["tokens_sampled"] > 0 and bk["flops_sampling"] == bw["flops_sampling"]


def test_budget_counts_every_rollout_round(config):
    # one round per step (P·G = 8 rows, one micro-batch), logged every 3rd step: rounds 0, 1, 3 leave no row in
    # metrics.jsonl, yet the rollout source counted what each sampled
    out = train(load_run_config(config("grpo", train={"max_steps": 5, "log_every": 3})))
    assert [r["step"] for r in _train_rows(out)] == [3, 5]
    b = _results(out)["budget"]
    assert b["completions_sampled"] == 5 * P * G and b["reward_model_calls"] == 0
    assert 5 * P * G <= b["tokens_sampled"] <= 5 * P * G * 12  # 1 to max_new_tokens per completion
    assert b["flops_sampling"] == 2 * _results(out)["total_params"] * b["tokens_sampled"]


def _rollouts(log) -> list[tuple[list[str], list[float]]]:
    """The (texts, scores) of each rollout round the reward scored, in order (held-out calls have 4 rows)."""
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    return [(c["completions"], c["scores"]) for c in calls if len(c["scores"]) == P * G]


@pytest.mark.parametrize("keep", ["best", "threshold"])
def test_rejection_sampling_keeps_the_best(keep, config, tmp_path):
    log = tmp_path / "scores.jsonl"
    rl = {"rewards": [{"name": EVEN, "log": str(log)}]}
    out = train(load_run_config(config("rejection_sampling", train={"max_steps": 3}, rl=rl,
                                       rejection_sampling={"keep": keep, "keep_threshold": 0.5})))
    res = _results(out)
    assert res["steps"] == 3 and math.isfinite(res["final_train_loss"])
    rounds = _rollouts(log)
    assert len(rounds) == 3  # one round per step: every kept row fits one micro-batch
    selected = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    for r, (texts, scores) in enumerate(rounds):
        if keep == "best":  # the first best completion of each group, if it reaches the threshold
            best = [g * G + max(range(G), key=lambda i: (scores[g * G + i], -i)) for g in range(P)]
            idx = [i for i in best if scores[i] >= 0.5]
        else:
            idx = [i for i, s in enumerate(scores) if s >= 0.5]
        got = [row for row in selected if row["round"] == r]
        assert [row["completion"] for row in got] == [texts[i] for i in idx]
        assert [row["reward"] for row in got] == pytest.approx([scores[i] for i in idx], rel=1e-6)
        assert all(row["reward"] >= 0.5 for row in got)
    assert {row["round"] for row in selected} <= {0, 1, 2}
    assert selected  # the toy's best completions mostly reach 0.5: the comparison above is not vacuous
    if keep == "best":
        assert len(selected) <= 3 * P
        for r in range(3):  # at most one row per prompt of the round
            prompts = [row["prompt"] for row in selected if row["round"] == r]
            assert len(set(prompts)) == len(prompts)
    kept = [row["kept"] for row in _train_rows(out)]
    assert kept == [sum(1 for row in selected if row["round"] == r) for r in range(3)]
    assert [row["kept_of"] for row in _train_rows(out)] == [P if keep == "best" else P * G] * 3


def test_rejection_sampling_keeping_nothing_still_steps(config):
    # every micro-batch has an empty loss mask: the loss is 0 over 0 tokens and still backpropagates (was:
    # "element 0 of tensors does not require grad" from an empty log-prob tensor outside the graph)
    out = train(load_run_config(config("rejection_sampling", train={"max_steps": 2},
                                   rejection_sampling={"keep": "threshold", "keep_threshold": 2.0})))
    rows = _train_rows(out)
    assert [(r["kept"], r["loss"], r["n_loss_units"]) for r in rows] == [(0, 0.0, 0), (0, 0.0, 0)]
    assert (out / "selected.jsonl").read_text() == ""


def test_online_dpo_with_lora(config):
    out = train(load_run_config(config("online_dpo", method="lora", train={"max_steps": 3})))
    res = _results(out)
    assert res["steps"] == 3 and math.isfinite(res["final_train_loss"])
    assert "reward_before" in res and "reward_after" in res
    rows = _train_rows(out)
    for r in rows:
        for key in ("reward_margin", "pref_accuracy", "tied_groups", "reward"):
            assert math.isfinite(r[key]), (key, r)
        assert r["tied_groups"] in range(P + 1)
    # LoRA starts at B = 0: the policy is the reference (adapter off) until the first update
    assert rows[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_grpo_lora_kl_to_the_adapter_off_reference(config):
    out = train(load_run_config(config("grpo", method="lora", train={"max_steps": 4}, grpo={"beta": 0.04})))
    rows = _train_rows(out)
    assert len(rows) == 4 and all(math.isfinite(r["loss"]) for r in rows)
    kls = [r["kl"] for r in rows]
    # k3 is non-negative; exp(d) − d − 1 at d ≈ 0 in fp32 may round to −1e-9
    assert all(math.isfinite(k) and k >= -1e-6 for k in kls)
    assert kls[0] == pytest.approx(0.0, abs=1e-6)  # zero-initialised LoRA: π_θ = π_ref before the first update
    assert max(kls[1:]) > 0  # afterwards the policy moved away from the adapter-off reference


def test_grpo_moving_reference_follows_the_policy(config):
    """reference.sync_every=1, sync_alpha=1: π_ref ← π_θ after every step, so each new round starts at KL 0."""
    out = train(load_run_config(config("grpo", method="lora", train={"max_steps": 4}, grpo={"beta": 0.04},
                                   reference={"sync_every": 1, "sync_alpha": 1.0})))
    assert all(r["kl"] == pytest.approx(0.0, abs=1e-6) for r in _train_rows(out))


def _cli(capsys, cfg) -> tuple[int, list[str]]:
    rc = main(["train", str(cfg)])
    return rc, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("eval_prompts", [4, 0])  # first called by the held-out measure / by the first rollout
def test_raising_reward_is_one_line(eval_prompts, config, capsys, tmp_path):
    cfg = config("grpo", rl={"rewards": [{"name": f"{REWARDS}:boom"}], "eval_prompts": eval_prompts})
    rc, err = _cli(capsys, cfg)
    assert rc == 2
    # the run has started (its report and data summary are on stderr, the console's stream): the error is the
    # last line, the only one, and no traceback
    assert err[-1] == f"error: reward '{REWARDS}:boom': RuntimeError: boom"
    assert [line for line in err if line.startswith("error")] == err[-1:]
    assert not any("Traceback" in line for line in err)
    # rewards are first called after the run directory is made; the run removes the folder it created
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name,expected", [
    ("no_such_reward", "unknown reward 'no_such_reward'"),
    (f"{REWARDS}:nope", f"reward '{REWARDS}:nope': module '{REWARDS}' has no attribute 'nope'"),
    ("tunelab_no_such_module:f", "reward 'tunelab_no_such_module:f': cannot import 'tunelab_no_such_module'"),
])
def test_bad_reward_name_fails_before_anything_is_written(name, expected, config, capsys, tmp_path):
    rc, err = _cli(capsys, config("grpo", rl={"rewards": [{"name": name}]}))
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {expected}"), err
    assert not (tmp_path / "run").exists()


def test_rl_run_records_learning_and_forgetting_and_loads_like_any_run(config, toy, tmp_path, monkeypatch):
    """eval.target / eval.source work for an RL run as for SFT, and its adapter loads and generates (`load_run`)."""
    from tunelab.export import load_run
    from tunelab.generate import generate

    root, _, data = toy
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    task = tmp_path / "prose.yaml"
    prose = write_jsonl(tmp_path / "prose.jsonl", [{"text": "The quick brown fox jumps over the lazy dog."}] * 2)
    task.write_text(f"name: prose\nkind: perplexity\ndata: {prose.name}\nformat: text\nmax_length: 32\n")
    out = train(load_run_config(config("grpo", method="lora", train={"max_steps": 2},
                                   eval={"target": [str(task)], "source": [str(task)]})))
    res = _results(out)
    assert set(res["eval"]["base"]) == {"prose"} and set(res["eval"]["final"]) == {"prose"}
    assert isinstance(res["learning_score"], float) and res["forgetting_score"] == -res["learning_score"]
    assert (out / "adapter" / "adapter_config.json").exists()
    model, tok, template = load_run(out, device="cpu")
    assert isinstance(generate(model, tok, [template.generation_prompt([{"role": "user", "content": "hi"}])],
                               max_new_tokens=3)[0], str)


@pytest.mark.parametrize("limit,refused", [(82, False), (None, True)])
def test_training_prompts_must_not_contain_heldout_task_problems(limit, refused, config, capsys, tmp_path):
    """HumanEval/0-81 may train; the full set contains humaneval_heldout's HumanEval/82-163 and is refused,
    before anything is written."""
    cfg = load_run_config(config("grpo", eval={"target": ["humaneval_heldout"], "allow_code_execution": True}))
    cfg.data.train = str(Path(__file__).resolve().parents[2] / "src/tunelab/assets/data/humaneval.jsonl")
    cfg.data.limit, cfg.data.eval_fraction, cfg.data.max_length = limit, 0.0, 4096
    if refused:
        with pytest.raises(TunelabError, match=r"humaneval.jsonl:83: this training prompt is also problem .* of "
                                               r"eval task 'humaneval_heldout'"):
            _encode_prompts(cfg)
    else:
        assert len(_encode_prompts(cfg).train) == 82


def _encode_prompts(cfg):
    from tunelab.data.sources import load_records
    from tunelab.data.templates import get_template
    from tunelab.models.load import load_model
    from tunelab.rl.prompts import PromptData

    _, tok = load_model(cfg.model.name, device="cpu")
    records = load_records(cfg.data.train, limit=cfg.data.limit)
    return PromptData().encode(tok, get_template("auto", tok), records, [], cfg)
