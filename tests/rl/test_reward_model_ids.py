"""The ``reward_model`` reward scores the prompt + completion ids as sampled (issue 24, defect 7): a cut row ends
where the budget cut it (no end of turn), a stopped row ends with the id it stopped on (and, when that is the end
of turn, the template's text after a closed turn, as the reward model's pairs end), and ids that do not survive
a decode/encode round trip are scored as they are. With another vocabulary or prompt rendering it falls back to
re-tokenised text and says so once."""

import copy

import pytest
import torch

from tests.rl.test_ppo import _reward_run
from tunelab.objectives.reward import load_reward_model, rewards
from tunelab.rl.rewards import RewardInputs, build_rewards

PROMPT = [{"role": "user", "content": "Count to three."}]


@pytest.fixture
def rm_run(tiny, tokenizer, tmp_path):
    run = _reward_run(tmp_path, tiny, tokenizer, "full")
    return run, load_reward_model(run, "cpu")


def _by_hand(rm, ids: list[int]) -> float:
    """The reward model's forward on exactly `ids` (one row, no padding)."""
    with torch.no_grad():
        return float(rewards(rm.model.eval(), {"input_ids": torch.tensor([ids]),
                                               "attention_mask": torch.ones(1, len(ids), dtype=torch.long)})[0])


def _spelled(tokenizer, word: str) -> list[int]:
    """`word` one character per token: ids the sampler may pick but the tokenizer never produces for the text."""
    ids = [tokenizer.convert_tokens_to_ids(c) for c in word]
    assert tokenizer.unk_token_id not in ids
    return ids


def _batch(tokenizer, rm, rows, policy_tokenizer):
    """RewardInputs of `rows` [(completion ids, finish reason)], all for PROMPT, as the rollout builds them."""
    prompt_ids = tokenizer(rm.template.generation_prompt(PROMPT), add_special_tokens=False)["input_ids"]
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in rows]
    record = {"messages": PROMPT + [{"role": "assistant", "content": "x"}]}
    return RewardInputs(texts, [record] * len(rows), [ids for ids, _ in rows], [f for _, f in rows],
                        [PROMPT] * len(rows), [prompt_ids] * len(rows), policy_tokenizer), prompt_ids


def _closing(tokenizer, rm) -> tuple[int, list[int]]:
    """ChatML by hand: a closed assistant turn is ``<|im_end|>`` then ``"\n"`` (the reward model's pairs end so)."""
    assert rm.template.generation_prompt(PROMPT).endswith("<|im_start|>assistant\n")
    return tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer("\n", add_special_tokens=False)["input_ids"]


def test_reward_model_scores_the_ids_as_sampled(rm_run, tokenizer, capsys):
    run, rm = rm_run
    eot, nl = _closing(tokenizer, rm)
    cut = _spelled(tokenizer, "three") + _spelled(tokenizer, "four")  # ran out of tokens mid-word
    plain = tokenizer(" one two", add_special_tokens=False)["input_ids"]
    stopped = plain + [eot]  # stopped on the end of turn it sampled
    odd = _spelled(tokenizer, "hello") + [eot]
    on_string = plain + tokenizer(" ####", add_special_tokens=False)["input_ids"]  # stopped by a stop string
    assert tokenizer(tokenizer.decode(cut), add_special_tokens=False)["input_ids"] != cut  # no round trip
    rows = [(cut, "length"), (stopped, "stop"), (odd, "stop"), (on_string, "stop")]
    batch, head = _batch(tokenizer, rm, rows, tokenizer)
    fn = build_rewards([{"name": "reward_model", "run_dir": str(run), "device": "cpu"}])
    got = fn(batch).total
    # the cut row and the stop-string row exactly as sampled; the rows that sampled the end of turn as sampled,
    # then the template's "\n" after a closed turn (where the reward model's training pairs end and r is read)
    want = [_by_hand(rm, head + cut), _by_hand(rm, head + stopped + nl), _by_hand(rm, head + odd + nl),
            _by_hand(rm, head + on_string)]
    assert got == pytest.approx(want, abs=1e-5)  # batched with padding = one unpadded forward per row
    assert len(set(round(x, 4) for x in got)) == 4
    # the old path (decode, re-tokenise, close a stopped row's turn with the template) scores other sequences
    # unless the ids round-trip and the row ended on the end of turn: then both are the same sequence
    old = [rm.score(PROMPT, text, closed=f != "length") for text, (_, f) in zip(batch.completions, rows)]
    assert old[1] == pytest.approx(want[1], abs=1e-5)
    assert all(abs(old[i] - want[i]) > 1e-4 for i in (0, 2, 3)), (old, want)
    assert "re-tokenised" not in capsys.readouterr().err


def test_a_cut_row_gets_no_end_of_turn(rm_run, tokenizer):
    run, rm = rm_run
    eot, nl = _closing(tokenizer, rm)
    ids = tokenizer(" one two thr", add_special_tokens=False)["input_ids"]
    batch, head = _batch(tokenizer, rm, [(ids, "length"), (ids + [eot], "stop")], tokenizer)
    cut, closed = build_rewards([{"name": "reward_model", "run_dir": str(run), "device": "cpu"}])(batch).total
    assert cut == pytest.approx(_by_hand(rm, head + ids), abs=1e-5)
    assert closed == pytest.approx(_by_hand(rm, head + ids + [eot] + nl), abs=1e-5) and abs(cut - closed) > 1e-4


def test_another_vocabulary_falls_back_to_text_and_says_so_once(rm_run, tokenizer, capsys):
    run, rm = rm_run
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<policy_only_token>"])  # the policy's vocabulary is not the reward model's
    cut = _spelled(tokenizer, "three")
    rows = [(cut, "length"), (tokenizer(" one", add_special_tokens=False)["input_ids"], "stop")]
    batch, head = _batch(tokenizer, rm, rows, other)
    fn = build_rewards([{"name": "reward_model", "run_dir": str(run), "device": "cpu"}])
    got = fn(batch).total
    text = [rm.score(PROMPT, t, closed=f != "length") for t, (_, f) in zip(batch.completions, rows)]
    assert got == pytest.approx(text, abs=1e-5)
    assert got[0] != pytest.approx(_by_hand(rm, head + cut), abs=1e-4)  # not the sampled ids
    err = capsys.readouterr().err
    assert err.count("re-tokenised") == 1 and "vocabulary differs from the policy's" in err
    fn(batch)
    assert "re-tokenised" not in capsys.readouterr().err  # once per run


def test_another_prompt_rendering_falls_back_for_that_row(rm_run, tokenizer, capsys):
    run, rm = rm_run
    ids = _spelled(tokenizer, "three")
    batch, head = _batch(tokenizer, rm, [(ids, "length"), (ids, "length")], tokenizer)
    other_prompt = tokenizer("User: Count to three.\nAssistant:", add_special_tokens=False)["input_ids"]
    batch = RewardInputs(batch.completions, batch.prompt_records, batch.completion_ids, batch.finish_reasons,
                         batch.prompt_messages, [head, other_prompt], tokenizer)
    exact, fallback = build_rewards([{"name": "reward_model", "run_dir": str(run), "device": "cpu"}])(batch).total
    assert exact == pytest.approx(_by_hand(rm, head + ids), abs=1e-5)
    assert fallback == pytest.approx(rm.score(PROMPT, batch.completions[1], closed=False), abs=1e-5)
    assert "chat template renders a prompt" in capsys.readouterr().err


def test_from_samples_carries_the_prompt_ids_without_padding(tokenizer):
    from tunelab.sampling import Samples

    pad = tokenizer.pad_token_id
    samples = Samples(prompt_ids=torch.tensor([[pad, 5, 6], [7, 8, 9]]),
                      prompt_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]),
                      completion_ids=torch.tensor([[1, 2, pad], [3, 4, 5]]),
                      completion_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]), logprobs=torch.zeros(2, 3),
                      finish_reason=("stop", "length"), prompt_index=torch.tensor([0, 1]))
    batch = RewardInputs.from_samples(samples, ["a", "b"], [{"prompt": "p"}, {"prompt": "q"}], tokenizer=tokenizer)
    assert batch.prompt_ids == [[5, 6], [7, 8, 9]] and batch.completion_ids == [[1, 2], [3, 4, 5]]
    assert batch.tokenizer is tokenizer and batch.finish_reasons == ["stop", "length"]


# ------------------------------------------------------------------ missing_eot_penalty: the default said aloud
def test_truncation_hint_is_one_line_once_per_run(capsys):
    from tunelab.rl.signal import TruncationHint

    TruncationHint(None).round(0.5)  # the run penalises cut completions: nothing to say
    hint = TruncationHint("set ppo.missing_eot_penalty")
    hint.round(0.0)  # nothing was cut
    assert capsys.readouterr().err == ""
    hint.round(0.25)
    err = capsys.readouterr().err
    assert "25% of this round's completions ran out of rl.max_new_tokens" in err and "missing_eot_penalty" in err
    assert err.count("\n") == 1
    hint.round(0.5)
    assert capsys.readouterr().err == ""


def test_truncation_advice_only_for_a_reward_model_run_without_a_penalty(rm_run, tokenizer):
    from types import SimpleNamespace

    from tunelab.rl.rollout import _truncation_advice
    from tunelab.rl.rows.policy_gradient import PolicyGradientRows
    from tunelab.rl.rows.ppo import PPORows

    run, _ = rm_run
    rm = {"name": "reward_model", "run_dir": str(run), "device": "cpu"}

    def ppo(penalty):
        from tunelab.objectives import validate_run_config

        cfg = validate_run_config({"objective": "ppo", "model": {"name": "x"}, "ppo": {"missing_eot_penalty": penalty}})
        return PPORows(cfg, SimpleNamespace(tokenizer=tokenizer), 1)

    def grpo(mask_truncated):
        ctx = SimpleNamespace(tokenizer=tokenizer, objective=SimpleNamespace(advantage_estimator="grpo",
                                                                             mask_truncated=mask_truncated))
        return PolicyGradientRows(None, ctx, 1)

    assert "ppo.missing_eot_penalty (default 0" in _truncation_advice(build_rewards([rm]), ppo(0.0))
    assert _truncation_advice(build_rewards([rm]), ppo(1.0)) is None
    assert "truncation reward" in _truncation_advice(build_rewards([rm]), grpo(False))
    assert _truncation_advice(build_rewards([rm]), grpo(True)) is None
    assert _truncation_advice(build_rewards([rm, {"name": "truncation", "weight": 0.5}]), ppo(0.0)) is None
    assert _truncation_advice(build_rewards([rm, {"name": "truncation", "weight": 0.0}]), ppo(0.0)) is not None
    assert _truncation_advice(build_rewards([{"name": "format"}]), ppo(0.0)) is None  # no reward model
    from tunelab.rl.rows.pairs import PairRows

    def online_dpo(p):
        return PairRows(None, SimpleNamespace(tokenizer=tokenizer, objective=SimpleNamespace(missing_eos_penalty=p)), 1)

    assert "online_dpo.missing_eos_penalty" in _truncation_advice(build_rewards([rm]), online_dpo(0.0))
    assert _truncation_advice(build_rewards([rm]), online_dpo(0.5)) is None
