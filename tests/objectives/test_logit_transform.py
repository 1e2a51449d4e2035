"""The chunked lm_head applies each architecture's own logit transform (Granite ÷ logits_scaling, Cohere ×
logit_scale, Gemma 2 soft-cap): per-token log-probs equal log_softmax of the model's own forward logits, in
the objectives and in multiple-choice scoring, and an unreproduced transform is refused."""

import pytest
import torch

from tunelab.adapters import lora
from tunelab.errors import TunelabError
from tunelab.eval.choice import _scores_with_greedy
from tunelab.models.tiny import HEAD_ARCHS, tiny_model
from tunelab.objectives.logprobs import LogitTransform, logit_transform, token_logprobs

VOCAB = 128


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, 11), generator=g)
    attention = torch.ones_like(ids)
    attention[1, :4] = 0  # left padding
    loss = attention.bool().clone()
    loss[2, :5] = False  # a prompt
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}


def _model_logprobs(model, batch):
    """log p(x_t | x_<t) [B, T-1] from the model's own full forward (its logits, transform included)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = logits[:, :-1].float().log_softmax(-1)
    return logp.gather(-1, batch["input_ids"][:, 1:, None])[..., 0], logits[:, :-1].argmax(-1)


@pytest.mark.parametrize("arch", HEAD_ARCHS)
def test_chunked_logprobs_equal_the_models_own_logits(arch):
    model = tiny_model(arch, vocab_size=VOCAB).eval()
    batch = _batch()
    mask = batch["loss_mask"].clone()
    mask[:, 0] = False
    with torch.no_grad():
        want, argmax = _model_logprobs(model, batch)
        plain = model.get_output_embeddings()(model.model(input_ids=batch["input_ids"],
                                                          attention_mask=batch["attention_mask"]).last_hidden_state)
        lp = token_logprobs(model, batch, chunk_size=7)  # several chunks
        choice_lp, greedy = _scores_with_greedy(model, batch, chunk_size=7)
    m = mask[:, 1:]
    # the transform matters on these configs: the bare lm_head gives other log-probs
    untransformed = plain[:, :-1].float().log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    assert (untransformed[m] - want[m]).abs().max() > 1e-3
    torch.testing.assert_close(lp[:, 1:][m], want[m], atol=1e-5, rtol=0)
    assert float(lp[:, 1:][~m].abs().sum()) == 0.0
    torch.testing.assert_close(choice_lp[:, 1:][m], want[m], atol=1e-5, rtol=0)
    assert torch.equal(greedy[:, 1:][m], (argmax == batch["input_ids"][:, 1:])[m])


@pytest.mark.parametrize("arch", HEAD_ARCHS)
def test_gradients_match_the_models_own_loss(arch):
    batch = _batch(1)
    mask = batch["loss_mask"].clone()
    mask[:, 0] = False
    grads = []
    for ours in (True, False):
        model = tiny_model(arch, vocab_size=VOCAB)
        lp = token_logprobs(model, batch, chunk_size=5)[:, 1:] if ours else _model_logprobs(model, batch)[0]
        (-lp[mask[:, 1:]].sum()).backward()
        grads.append(model.get_output_embeddings().weight.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_transform_read_off_each_architecture():
    assert logit_transform(tiny_model("granite", vocab_size=VOCAB)) == LogitTransform(divisor=4.0)
    assert logit_transform(tiny_model("cohere", vocab_size=VOCAB)) == LogitTransform(multiplier=0.25)
    assert logit_transform(tiny_model("gemma2", vocab_size=VOCAB)) == LogitTransform(softcap=0.5)
    assert logit_transform(tiny_model("llama", vocab_size=VOCAB)) == LogitTransform()
    cohere = tiny_model("cohere", vocab_size=VOCAB)
    cohere.logit_scale = 0.5  # the module's own copy is what its forward multiplies by
    assert logit_transform(cohere).multiplier == 0.5


def test_unreproduced_transforms_are_refused():
    model = tiny_model("llama", vocab_size=VOCAB)
    model.config.output_multiplier = 3.0  # e.g. MuseGlimmer's pre-softcap multiplier, on an unknown head
    with pytest.raises(TunelabError, match=r"output_multiplier=3\.0 changes the model's logits"):
        token_logprobs(model, _batch())
    model.config.output_multiplier = 1.0  # neutral: fine
    token_logprobs(model, _batch())
    granite = tiny_model("granite", vocab_size=VOCAB)
    granite.config.final_logit_softcapping = 10.0  # consumed generically: Granite + soft-cap is reproduced
    assert logit_transform(granite) == LogitTransform(divisor=4.0, softcap=10.0)
    model.config.model_type = "modernbert-decoder"
    with pytest.raises(TunelabError, match="dense\\+norm prediction head"):
        logit_transform(model)


def test_choice_scores_respect_a_lora_on_the_head():
    model = tiny_model("granite", vocab_size=VOCAB).eval()
    lora.wrap(model, lora.LoraConfig(r=2, target_modules=["lm_head"]))
    with torch.no_grad():
        model.lm_head.lora_B.weight.normal_(0, 0.5)
    batch = _batch(2)
    mask = batch["loss_mask"].clone()
    mask[:, 0] = False
    with torch.no_grad():
        want, argmax = _model_logprobs(model, batch)
        choice_lp, greedy = _scores_with_greedy(model, batch, chunk_size=4)
    m = mask[:, 1:]
    torch.testing.assert_close(choice_lp[:, 1:][m], want[m], atol=1e-5, rtol=0)
    assert torch.equal(greedy[:, 1:][m], (argmax == batch["input_ids"][:, 1:])[m])
