"""Run EleutherAI lm-evaluation-harness tasks on a tunelab model (optional extra: ``pip install lm-eval``).

lm-eval talks to a model through three request types; `HarnessAdapter` implements them with tunelab's own
machinery, so a model evaluated here is scored exactly as tunelab's bundled tasks score it:

``loglikelihood``          (context, continuation) → (log p(continuation | context), is_greedy), via
                           `choice.score_continuations` (chunked lm_head, lm-eval's tokenization split).
``loglikelihood_rolling``  (text,) → log p(text), every token predicted once, in windows of `max_length`
                           tokens that each keep as much preceding context as fits (lm-eval's scheme).
``generate_until``         (context, gen_kwargs) → continuation cut at gen_kwargs["until"], via
                           `completion.complete` (greedy unless do_sample; `max_gen_toks` new tokens).

The adapter itself does not import lm_eval (tests drive it with stub requests that only have ``.args``);
`make_lm` wraps it in lm_eval's ``LM`` base class and `run_harness` calls ``lm_eval.simple_evaluate``. Local
task folders (``include_path``) are supported; whether a task downloads a hub dataset is up to that task.
"""

from __future__ import annotations

from ..data.masking import Encoded, adds_bos
from ..errors import TunelabError
from .choice import score_continuations, score_encoded
from .completion import complete

_NOT_METRICS = {"sample_len", "sample_count", "samples"}  # bookkeeping entries in lm-eval's results


class HarnessAdapter:
    """lm-eval's model interface over a (model, tokenizer[, template]) triple."""

    def __init__(self, model, tokenizer, template=None, batch_size: int = 8, max_length: int | None = None,
                 max_gen_toks: int = 256):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.batch_size = batch_size
        self.max_length = max_length or getattr(model.config, "max_position_embeddings", 2048)
        self.max_gen_toks = max_gen_toks

    # -- lm-eval request types -------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args[:2]) for r in requests]
        scores = score_continuations(self.model, self.tokenizer, pairs, self.batch_size, greedy=True,
                                     max_length=self.max_length)
        return [(s.logprob, bool(s.is_greedy)) for s in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for r in requests:
            windows = self.rolling_windows(r.args[0])
            scores = score_encoded(self.model, windows, self.tokenizer.pad_token_id, self.batch_size)
            out.append(sum(s.logprob for s in scores))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):  # requests with the same settings are generated as one batch
            groups.setdefault(repr(sorted((r.args[1] or {}).items())), []).append(i)
        for idx in groups.values():
            kw = dict(requests[idx[0]].args[1] or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            do_sample = bool(kw.pop("do_sample", False)) and float(kw.get("temperature", 1.0) or 0) > 0
            texts = complete(self.model, self.tokenizer, [requests[i].args[0] for i in idx],
                             max_new_tokens=int(kw.pop("max_gen_toks", self.max_gen_toks)), stop=until,
                             do_sample=do_sample, temperature=float(kw.get("temperature", 1.0) or 1.0),
                             top_p=float(kw.get("top_p", 1.0) or 1.0), batch_size=self.batch_size)
            for i, t in zip(idx, texts):
                out[i] = t
        return out

    # -- helpers lm-eval may call ------------------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "tokenizer").replace("/", "__")

    def chat_template(self, chat_template=False) -> str | None:
        return self.template.jinja if self.template is not None else None

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        if self.template is None:
            raise TunelabError("apply_chat_template: this adapter was built without a template")
        msgs = self.template.prepare(chat_history)
        return self.template.render(msgs, add_generation_prompt=add_generation_prompt)

    def rolling_windows(self, text: str) -> list[Encoded]:
        """Windows predicting every token of `text` once, each with up to `max_length` tokens of input."""
        tok = self.tokenizer
        ids = tok(text, add_special_tokens=False)["input_ids"]
        start = tok.bos_token_id if adds_bos(tok) or tok.eos_token_id is None else tok.eos_token_id
        seq, L = [start] + ids, self.max_length
        windows, a = [], 1  # seq[0] is the prefix token: never a target
        while a < len(seq):
            b = min(len(seq), a + L - 1 if a > 1 else L)  # first window: L inputs, L-1 targets
            lo = max(0, b - L)
            window = seq[lo:b]
            mask = [lo + j >= a for j in range(len(window))]
            windows.append(Encoded(window, mask, n_trained=sum(mask)))
            a = b
        return windows


def make_lm(model, tokenizer, template=None, **kwargs):
    """An ``lm_eval.api.model.LM`` instance backed by `HarnessAdapter` (needs lm-eval installed)."""
    try:
        from lm_eval.api.model import LM
    except ImportError:
        raise TunelabError("lm-eval-harness is not installed: pip install lm-eval") from None

    class TunelabLM(HarnessAdapter, LM):
        def __init__(self):
            LM.__init__(self)
            HarnessAdapter.__init__(self, model, tokenizer, template, **kwargs)

    return TunelabLM()


def run_harness(model, tokenizer, tasks: list[str], *, template=None, include_path: str | None = None,
                include_defaults: bool = True, limit: int | float | None = None, num_fewshot: int | None = None,
                apply_chat_template: bool = False, batch_size: int = 8,
                confirm_run_unsafe_code: bool = False) -> dict:
    """Evaluate lm-eval `tasks` (names known to lm-eval, or defined in YAMLs under `include_path`; pass
    ``include_defaults=False`` to see only the latter).

    Returns ``{"harness:<task>": result}`` in `run_tasks`' result format (metrics without lm-eval's
    ``,filter`` suffix when the filter is ``none``; stderr entries dropped), ready for `learning_forgetting`.
    """
    lm = make_lm(model, tokenizer, template, batch_size=batch_size)
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    # Indexing lm-eval's thousands of bundled task files takes seconds; skip it when only local tasks are run.
    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    raw = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                          apply_chat_template=apply_chat_template, confirm_run_unsafe_code=confirm_run_unsafe_code,
                          log_samples=False, bootstrap_iters=0)
    return harness_results(raw)


def harness_results(raw: dict) -> dict:
    """lm-eval's ``simple_evaluate`` output → ``{"harness:<task>": {"n", "metrics", "primary", ...}}``."""
    out = {}
    for task, vals in (raw or {}).get("results", {}).items():
        metrics = {}
        for key, v in vals.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or "_stderr" in key or key in _NOT_METRICS:
                continue
            name, _, filt = key.partition(",")
            metrics[name if filt in ("", "none") else key] = float(v)
        hib = {k: bool(v) for k, v in raw.get("higher_is_better", {}).get(task, {}).items()}
        hib = {m: hib.get(m.split(",")[0], True) for m in metrics}
        primary = next((m for m in ("acc_norm", "acc", "exact_match", "pass@1", "word_perplexity") if m in metrics),
                       next(iter(metrics), None))
        n = raw.get("n-samples", {}).get(task, {})
        out[f"harness:{task}"] = {"task": f"harness:{task}", "kind": "harness", "metrics": metrics,
                                  "primary": primary, "higher_is_better": hib,
                                  "n": n.get("effective", n.get("original")) if isinstance(n, dict) else None}
    return out
