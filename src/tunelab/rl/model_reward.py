"""The ``reward_model`` reward: r(x, y) of a tunelab ``objective: reward`` run, scored on the ids as sampled.

**Which tokens are scored.** The policy samples token ids; the text the other rewards read is their decoding.
When the reward model reads the policy's vocabulary (its tokenizer's ``get_vocab()`` equals the policy's,
checked once per policy tokenizer) and its chat template renders row i's prompt into exactly the prompt ids the
policy was given, row i is scored on

    generation-prompt ids + completion ids, exactly as sampled

A row that stopped ends with the end-of-turn/eos id it sampled; when that id is the template's end of turn,
the template's text after a closed turn follows (ChatML's ``"\n"``; nothing for Llama 3): the reward model was
trained on turns closed that way and reads r at their last token (`RewardModel.encode_ids`). A row cut by
``rl.max_new_tokens`` (finish reason ``length``) ends where the budget cut it: no end of turn is added, so the
model scores the unfinished turn it was given, not a turn the policy never closed. Scoring re-tokenised text
instead is not the same thing: decode → encode does not give back the sampled ids in general (a BPE merge
across a piece boundary, special-token text, ids the sampler picked that the tokenizer would never produce).

**Fallback.** With another vocabulary, another rendering of the prompt, or a batch without the ids (a
`RewardInputs` built by hand) the row is scored from text as `RewardModel.encode` renders it: the prompt by the
reward model's own template + the completion text, re-tokenised, the turn closed by the template's end of turn
for a row that stopped and left open for a cut one. One log line says so, once per reason.

**Truncated rows.** The score of a cut completion is whatever the reward model gives an open turn; nothing else
is subtracted unless the run asks: PPO's ``ppo.missing_eot_penalty`` p (default 0, TRL's default) makes the score
s' = s − p for every row that ran out of tokens (rl/ppo_round.py `sequence_scores`); grpo/rloo have the
``truncation`` reward and ``grpo.mask_truncated``, online DPO ``online_dpo.missing_eos_penalty``. A run with a reward model, cut completions and none of these
gets a one-line hint (rl/signal.py `TruncationHint`).

Rows are scored `BATCH` at a time (right-padded; r at each row's last real token), not one forward per row.
"""

from __future__ import annotations

from pathlib import Path

from ..console import console

BATCH = 8  # sequences per reward-model forward


class ModelReward:
    """The ``reward_model`` RewardFn: ``fn(batch: RewardInputs) -> list[float]``; the model loads on first call."""

    def __init__(self, run_dir: Path, device: str = "auto"):
        self.run_dir, self.device = run_dir, device
        self.model = None  # objectives.reward.RewardModel
        self.vocab_checked: tuple[object, bool] | None = None  # (policy tokenizer, same vocabulary as ours)
        self.said: set[str] = set()

    def __call__(self, batch) -> list[float]:
        if self.model is None:
            from ..objectives.reward import load_reward_model

            self.model = load_reward_model(self.run_dir, self.device)
        rm = self.model
        why = self._no_sampled_ids(batch)
        finish = batch.finish_reasons or [None] * len(batch)
        examples = []
        for i, text in enumerate(batch.completions):
            messages = batch.messages(i)
            if why is None:
                if rm.prompt_ids(messages) == list(batch.prompt_ids[i]):
                    examples.append(rm.encode_ids(batch.prompt_ids[i], batch.completion_ids[i],
                                                  closed=finish[i] != "length"))
                    continue
                self._say("template", f"its chat template renders a prompt ({batch.prompt_records[i].origin}) into "
                          "other tokens than the policy was prompted with")
            # a completion cut by max_new_tokens is scored as generated: no end of turn closes it
            examples.append(rm.encode(messages, text, closed=finish[i] != "length"))
        return rm.score_encoded(examples, BATCH)

    def _no_sampled_ids(self, batch) -> str | None:
        """Why no row of `batch` can be scored on its sampled ids, or None when they can."""
        if batch.completion_ids is None or batch.prompt_ids is None:
            return self._say("ids", "the batch carries no sampled token ids")
        if batch.tokenizer is None:
            return self._say("tokenizer", "the policy's tokenizer is not given (RewardInputs.tokenizer)")
        if self.vocab_checked is None or self.vocab_checked[0] is not batch.tokenizer:
            self.vocab_checked = (batch.tokenizer, batch.tokenizer.get_vocab() == self.model.tokenizer.get_vocab())
        if not self.vocab_checked[1]:
            return self._say("vocab", "its tokenizer's vocabulary differs from the policy's")
        return None

    def _say(self, key: str, why: str) -> str:
        if key not in self.said:
            self.said.add(key)
            console.print(f"reward 'reward_model' ({self.run_dir}): scoring re-tokenised text, not the sampled ids: "
                          f"{why}", highlight=False, soft_wrap=True)
        return why
