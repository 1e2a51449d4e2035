"""Each preference loss equals its formula on a hand-computed example, and TRL 1.16's loss on the same log-probs.

TRL computes its losses inside `_compute_loss` methods that also run the model; we call them with a minimal
`self` and a stand-in model whose per-token log-probs sum to the sequence log-probs we chose, so both sides
see identical inputs.
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tunelab.objectives.dpo import dpo_losses
from tunelab.objectives.kto import kto_losses, kto_z0, weight_warning
from tunelab.objectives.orpo import log1mexp, log_odds_ratio, orpo_losses
from tunelab.objectives.simpo import simpo_losses


def t(*x):
    return torch.tensor(x, dtype=torch.float64)


def lsig(x):  # log σ(x), written out
    return -math.log1p(math.exp(-x))


# One pair: policy L(y⁺) = −10, L(y⁻) = −12; reference −11, −11 → h = (−10+11) − (−12+11) = 2. Lengths 4 and 5.
LC, LR, RC, RR, NC, NR = t(-10.0), t(-12.0), t(-11.0), t(-11.0), t(4.0), t(5.0)


def test_dpo_family_by_hand():
    b, h, eps = 0.1, 2.0, 0.2
    assert dpo_losses(LC, LR, RC, RR, b).item() == pytest.approx(-lsig(b * h))  # 0.5981…
    assert dpo_losses(LC, LR, RC, RR, b).item() == pytest.approx(0.598138869381592)
    cdpo = -(1 - eps) * lsig(b * h) - eps * lsig(-b * h)
    assert dpo_losses(LC, LR, RC, RR, b, "cdpo", eps).item() == pytest.approx(cdpo)
    robust = (-(1 - eps) * lsig(b * h) + eps * lsig(-b * h)) / (1 - 2 * eps)
    assert dpo_losses(LC, LR, RC, RR, b, "robust", eps).item() == pytest.approx(robust)
    assert dpo_losses(LC, LR, RC, RR, b, "hinge").item() == pytest.approx(1 - b * h)
    assert dpo_losses(LC, LR, RC, RR, 1.0, "hinge").item() == 0.0  # margin met: max(0, 1 − 2)
    hbar = 1 / 4 - (-1) / 5  # per-token log-ratios
    assert dpo_losses(LC, LR, RC, RR, b, "ipo", nc=NC, nr=NR).item() == pytest.approx((hbar - 1 / (2 * b)) ** 2)


def test_simpo_orpo_kto_by_hand():
    ac, ar = -10 / 4, -12 / 5
    z = 2.0 * (ac - ar) - 1.0  # β = 2, γ = 0.5·β
    assert simpo_losses(LC / NC, LR / NR).item() == pytest.approx(-lsig(z))
    lor = (ac - ar) - (math.log(1 - math.exp(ac)) - math.log(1 - math.exp(ar)))
    assert log_odds_ratio(t(ac), t(ar)).item() == pytest.approx(lor)
    assert orpo_losses(t(ac), t(ar))[0].item() == pytest.approx(-ac - 0.1 * lsig(lor))
    # KTO: r = Δ; z0 = max(0, mean of mismatched Δ), detached.
    z0 = kto_z0(t(-9.0, -7.0), t(-10.0, -10.0))  # Δ' = 1, 3 → 2
    assert z0.item() == 2.0 and kto_z0(t(-12.0), t(-10.0)).item() == 0.0
    got = kto_losses(t(-10.0, -12.0), t(-11.0, -11.0), torch.tensor([True, False]), z0, 0.1, 1.0, 1.5)
    want = [1 - 1 / (1 + math.exp(-0.1 * (1 - 2))), 1.5 * (1 - 1 / (1 + math.exp(-0.1 * (2 + 1))))]
    assert got.tolist() == pytest.approx(want)


def test_log1mexp_is_stable():
    x = t(-1e-10, -0.5, -0.7, -5.0, -50.0)
    ref = [math.log(-math.expm1(v)) for v in x.tolist()]
    assert log1mexp(x).tolist() == pytest.approx(ref, rel=1e-12)
    assert torch.isfinite(log_odds_ratio(t(0.0), t(-1.0)))  # P̄ = 1 is clamped, not inf/NaN


def test_kto_weight_warning():
    assert weight_warning(100, 100) is None and weight_warning(120, 100) is None
    msg = weight_warning(100, 400)
    assert "imbalanced" in msg and "desirable_weight in [4.00, 5.33]" in msg
    assert weight_warning(100, 400, desirable_weight=4.0) is None
    assert "only desirable" in weight_warning(10, 0)


# ------------------------------------------------------------------------------------------------- TRL
trl = pytest.importorskip("trl")
P = 3
pol = t(-10.0, -20.0, -7.5), t(-12.0, -18.0, -9.0)
ref = t(-11.0, -19.0, -8.0), t(-11.5, -19.5, -8.5)
lens = t(4, 6, 3), t(5, 2, 3)


class Acc:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    gather = gather_for_metrics


def _rows(logps, lengths, T):
    """completion_mask [N, T] and per-token log-probs [N, T-1] (aligned with completion_mask[:, 1:])."""
    cm, lp = torch.zeros(len(logps), T, dtype=torch.long), torch.zeros(len(logps), T - 1, dtype=torch.float64)
    for i, (s, n) in enumerate(zip(logps.tolist(), lengths.long().tolist())):
        cm[i, 1:1 + n] = 1
        lp[i, :n] = s / n
    return cm, lp


def _outputs(lp):
    return SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp), mean_logits=torch.zeros_like(lp),
                           is_top1=torch.zeros_like(lp, dtype=torch.bool))


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "robust", "hinge"])
def test_dpo_equals_trl(loss):
    from trl.trainer.dpo_trainer import DPOTrainer

    beta, eps = 0.1, (0.2 if loss == "robust" else 0.0)
    cm, lp = _rows(torch.cat(pol), torch.cat(lens), 8)
    fake = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=Acc(), aux_loss_enabled=False,
                           ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                           loss_types=[loss], loss_weights=[1.0], beta=beta, label_smoothing=eps,
                           use_weighting=False, _metrics={"train": defaultdict(list)}, _total_train_tokens=0,
                           _tp_size=1, args=SimpleNamespace(gradient_checkpointing_kwargs=None))
    inputs = {"input_ids": torch.zeros_like(cm), "attention_mask": torch.ones_like(cm), "completion_mask": cm,
              "ref_chosen_logps": ref[0], "ref_rejected_logps": ref[1]}
    theirs = DPOTrainer._compute_loss(fake, lambda **kw: _outputs(lp), inputs, False)
    ours = dpo_losses(pol[0], pol[1], ref[0], ref[1], beta, loss, eps, lens[0], lens[1]).mean()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-9)


def test_simpo_equals_trl_cpo():
    from trl.experimental.cpo import CPOTrainer

    ac, ar = pol[0] / lens[0], pol[1] / lens[1]
    fake = SimpleNamespace(alpha=0.0, beta=2.0, simpo_gamma=1.0, loss_type="simpo", label_smoothing=0.0,
                           accelerator=Acc())
    theirs, _, _ = CPOTrainer.cpo_loss(fake, ac, ar)
    assert simpo_losses(ac, ar, 2.0, 0.5).tolist() == pytest.approx(theirs.tolist(), rel=1e-9)


def test_orpo_equals_trl():
    from trl.experimental.orpo import ORPOTrainer

    ac, ar = pol[0] / lens[0], pol[1] / lens[1]
    fake = SimpleNamespace(beta=0.1, accelerator=Acc())
    ratio_term, _, _, _, log_odds = ORPOTrainer.odds_ratio_loss(fake, ac, ar)
    # TRL: loss = NLL − mean(β·log σ(log OR)); with equal NLL terms the totals match. TRL casts to fp32.
    ours, lor = orpo_losses(ac, ar, 0.1)
    assert ours.mean().item() == pytest.approx((-ac).mean().item() - ratio_term.mean().item(), rel=1e-6)
    assert lor.mean().item() == pytest.approx(log_odds.item(), rel=1e-6)


def test_kto_equals_trl():
    from trl.trainer.kto_trainer import KTOTrainer

    logps, refs = torch.cat([pol[0], pol[1]]), torch.cat([ref[0], ref[1]])
    n = torch.cat(lens)
    labels = torch.tensor([True, False, True, True, False, False])
    kl_pol, kl_ref = t(-15.0, -9.0, -20.0, -11.0, -7.0, -13.0), t(-16.0, -10.5, -19.0, -12.0, -8.0, -12.5)
    cm, lp = _rows(logps, n, 8)
    kcm, klp = _rows(kl_pol, t(3, 3, 3, 3, 3, 3), 5)  # another width, so the stand-in model can tell them apart
    fake = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=Acc(), calculate_KL=True,
                           aux_loss_enabled=False, precompute_ref_logps=True, loss_type="kto", beta=0.1,
                           desirable_weight=1.0, undesirable_weight=1.3, _metrics={"train": defaultdict(list)},
                           _total_train_tokens=0, _tp_size=1, args=SimpleNamespace(gradient_checkpointing_kwargs=None))
    fake._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(fake, model, batch)
    batch = {"input_ids": torch.zeros_like(cm), "attention_mask": torch.ones_like(cm), "completion_mask": cm,
             "KL_input_ids": torch.zeros_like(kcm), "KL_attention_mask": torch.ones_like(kcm),
             "KL_completion_mask": kcm, "label": labels, "ref_logps": refs, "ref_KL_logps": kl_ref}
    theirs = KTOTrainer._compute_loss(fake, lambda **kw: _outputs(lp if kw["input_ids"].shape[1] == 8 else klp),
                                      batch, False)
    ours = kto_losses(logps, refs, labels, kto_z0(kl_pol, kl_ref), 0.1, 1.0, 1.3).mean()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-9)
