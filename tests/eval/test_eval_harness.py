"""lm-eval adapter: its three request types with stub requests, and (if lm-eval is installed) a local task."""

import json
from types import SimpleNamespace

import pytest
import torch

from tunelab.data.templates import get_template
from tunelab.eval.choice import score_continuations
from tunelab.eval.harness import HarnessAdapter, harness_results


def req(*args):
    return SimpleNamespace(args=args)  # lm-eval's Instance exposes its request through .args


@pytest.fixture
def adapter(tokenizer, tiny):
    return HarnessAdapter(tiny("llama").eval(), tokenizer, get_template("chatml", tokenizer), batch_size=2)


def test_loglikelihood_matches_scorer(adapter, tokenizer):
    pairs = [("The cat sat on the", " mat"), ("1, 2, 3,", " 4")]
    out = adapter.loglikelihood([req(*p) for p in pairs])
    want = score_continuations(adapter.model, tokenizer, pairs, greedy=True)
    assert [o[0] for o in out] == pytest.approx([w.logprob for w in want])
    assert all(isinstance(o[1], bool) for o in out)


def test_rolling_loglikelihood_scores_every_token_once(adapter, tokenizer):
    text = "It was the best of times, it was the worst of times, it was the age of wisdom."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    adapter.max_length = 6
    windows = adapter.rolling_windows(text)
    assert sum(sum(w.loss_mask) for w in windows) == len(ids)
    assert all(len(w.input_ids) <= 6 and not w.loss_mask[0] for w in windows)
    # With room for the whole text, rolling = one forward pass over eos + text.
    adapter.max_length = 512
    (whole,) = adapter.loglikelihood_rolling([req(text)])
    seq = torch.tensor([[tokenizer.eos_token_id] + ids])
    with torch.no_grad():
        logp = adapter.model(seq).logits[0, :-1].log_softmax(-1)
    assert whole == pytest.approx(logp.gather(1, seq[0, 1:, None]).sum().item(), rel=1e-4)


def test_generate_until_cuts_at_stop(adapter, monkeypatch):
    import tunelab.eval.harness as harness

    calls = []

    def fake_complete(model, tok, prompts, **kw):
        calls.append(kw)
        return [f"out{i}" for i in range(len(prompts))]

    monkeypatch.setattr(harness, "complete", fake_complete)
    out = adapter.generate_until([req("a", {"until": ["\n"], "max_gen_toks": 5}), req("b", {"until": "Q:"}),
                                  req("c", {"until": ["\n"], "max_gen_toks": 5})])
    assert out == ["out0", "out0", "out1"]  # a and c share settings, so they form one batch
    assert calls[0]["stop"] == ["\n"] and calls[0]["max_new_tokens"] == 5 and calls[1]["stop"] == ["Q:"]
    assert calls[1]["max_new_tokens"] == 256 and calls[0]["do_sample"] is False


def test_generate_until_real_stop_string(adapter):
    (text,) = adapter.generate_until([req("Hello", {"until": ["e"], "max_gen_toks": 6})])
    assert "e" not in text


def test_harness_results_conversion():
    raw = {"results": {"x": {"alias": "x", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.6,
                             "sample_len": 2}},
           "higher_is_better": {"x": {"acc": True, "acc_norm": True}}, "n-samples": {"x": {"effective": 2}}}
    out = harness_results(raw)["harness:x"]
    assert out["metrics"] == {"acc": 0.5, "acc_norm": 0.6} and out["primary"] == "acc_norm" and out["n"] == 2


def test_local_lm_eval_task(adapter, tokenizer, tmp_path):
    pytest.importorskip("lm_eval")
    from tunelab.eval.harness import run_harness

    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "2 + 2 =", "choices": ["4", "5"], "label": 0},
        {"question": "The sky is", "choices": ["blue", "green"], "label": 0}]))
    (tmp_path / "tl_mc.yaml").write_text(
        "task: tl_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {tmp_path / 'hf'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    out = run_harness(adapter.model, tokenizer, ["tl_mc"], include_path=str(tmp_path), include_defaults=False)
    r = out["harness:tl_mc"]
    assert r["n"] == 2 and r["metrics"]["acc"] in (0.0, 0.5, 1.0)
    # Same numbers as our own scorer: lm-eval asks for "question" + " choice".
    scores = score_continuations(adapter.model, tokenizer, [("2 + 2 =", " 4"), ("2 + 2 =", " 5"),
                                                           ("The sky is", " blue"), ("The sky is", " green")])
    acc = ((scores[0].logprob > scores[1].logprob) + (scores[2].logprob > scores[3].logprob)) / 2
    assert r["metrics"]["acc"] == acc
