"""SFT adds the router load-balancing loss of mixture-of-experts models configured as real checkpoints are
(`output_router_logits: false`), equal to the model's own aux loss and transformers' load_balancing_loss_func."""

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from tunelab.models.tiny import MOE_ARCHS, tiny_model
from tunelab.objectives.logprobs import token_logprobs
from tunelab.objectives.sft import SFT, router_aux

VOCAB = 128


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, 10), generator=g)
    attention = torch.ones_like(ids)
    attention[0, :3] = 0  # left padding: excluded from the balance statistics, as in the model's forward
    loss = attention.bool().clone()
    loss[1, :4] = False
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_aux_loss_is_added_without_output_router_logits(arch):
    model = tiny_model(arch, vocab_size=VOCAB).eval()  # eval: no dropout, so the forwards below agree
    assert not model.config.output_router_logits  # as real checkpoints ship
    batch = _batch()
    loss_sum, n, metrics = SFT(chunk_size=8).loss(model, batch)
    assert "router_aux_loss" in metrics
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
        nll = -token_logprobs(model, batch).sum()
    want = load_balancing_loss_func(out.router_logits, model.num_experts, model.num_experts_per_tok,
                                    batch["attention_mask"])
    assert metrics["router_aux_loss"] == pytest.approx(float(want), rel=1e-6)
    assert metrics["router_aux_loss"] == pytest.approx(float(out.aux_loss), rel=1e-6)  # the model's own
    coef = model.config.router_aux_loss_coef
    assert coef > 0
    assert float(loss_sum.detach()) == pytest.approx(float(nll + coef * want * n), rel=1e-6)


def test_aux_loss_trains_the_router_and_can_be_turned_off():
    batch = _batch(1)
    model = tiny_model("mixtral", vocab_size=VOCAB)
    loss_sum, n, _ = SFT().loss(model, batch)
    (loss_sum / n).backward()
    with_aux = model.model.layers[0].mlp.gate.weight.grad.clone()
    model.zero_grad()
    (-token_logprobs(model, batch).sum() / n).backward()
    assert not torch.allclose(with_aux, model.model.layers[0].mlp.gate.weight.grad)  # aux reaches the router
    model.config.router_aux_loss_coef = 0.0
    model.router_aux_loss_coef = 0.0  # the value MixtralForCausalLM itself stores and uses
    assert router_aux(model) is None
    loss_sum, n, metrics = SFT().loss(model, batch)
    assert "router_aux_loss" not in metrics
    with torch.no_grad():
        assert float(loss_sum.detach()) == pytest.approx(float(-token_logprobs(model, batch).sum()), rel=1e-6)


def test_dense_models_have_no_aux_loss():
    model = tiny_model("llama", vocab_size=VOCAB)
    assert router_aux(model) is None
    assert "router_aux_loss" not in SFT().loss(model, _batch())[2]
