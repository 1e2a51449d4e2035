"""Round statistics under torchrun (CPU, gloo, 2 processes): REINFORCE++'s batch normalisation and the
train–inference mismatch are over every rank's rows, so 2 ranks × b rows give what 1 process × 2b rows gives
(the paper, verl and OpenRLHF normalise the global batch; the mismatch max is a max, not a mean over ranks)."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tunelab.objectives.policy_loss import mismatch
from tunelab.rl.advantages import reinforce_pp, reinforce_pp_baseline

G, B = 2, 8  # groups of 2, 8 rows: 4 per rank


def _inputs():
    gen = torch.Generator().manual_seed(3)
    rewards = torch.tensor([0.0, 1.0, 3.0, 3.5, 0.2, 0.1, 9.0, 7.0])  # rank 1's rewards are larger and wider
    group = torch.arange(B) // G
    sampler = torch.randn(B, 5, generator=gen)
    trainer = sampler + 0.01 * torch.randn(B, 5, generator=gen)
    trainer[6, 2] += 0.5  # the largest |Δ log p| is on rank 1
    mask = torch.rand(B, 5, generator=gen) > 0.3
    mask[:4, 3:] = False  # rank 0 has fewer tokens than rank 1: a mean of the ranks' means is not the mean
    return rewards, group, sampler, trainer, mask


def _rank(rank: int, init: str, out: str) -> None:
    from tunelab.rl.collective import all_max, all_sum

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    rows = slice(rank * B // 2, (rank + 1) * B // 2)
    rewards, group, sampler, trainer, mask = (x[rows] for x in _inputs())
    torch.save({"reinforce_pp": reinforce_pp(rewards, group, all_sum=all_sum),
                "reinforce_pp_baseline": reinforce_pp_baseline(rewards, group, all_sum=all_sum),
                "mismatch": mismatch(sampler, trainer, mask, all_sum, all_max)}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_normalise_and_measure_the_whole_batch(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    rewards, group, sampler, trainer, mask = _inputs()
    for name, fn in (("reinforce_pp", reinforce_pp), ("reinforce_pp_baseline", reinforce_pp_baseline)):
        one = fn(rewards, group)  # one process, all 8 rows
        two = torch.cat([r[name] for r in ranks])
        torch.testing.assert_close(two, one, rtol=1e-6, atol=1e-6)
        per_rank = torch.cat([fn(rewards[:4], group[:4]), fn(rewards[4:], group[4:])])  # the former behaviour
        assert (per_rank - one).abs().max() > 0.1, name
    want = mismatch(sampler, trainer, mask)
    for r in ranks:  # every rank holds the whole batch's values, so the loop's mean over ranks keeps them
        assert abs(r["mismatch"]["mismatch_kl"] - want["mismatch_kl"]) < 1e-12
        assert r["mismatch"]["mismatch_max_abs_logp"] == want["mismatch_max_abs_logp"]
    halves = [mismatch(sampler[s], trainer[s], mask[s]) for s in (slice(0, 4), slice(4, 8))]
    assert sum(h["mismatch_max_abs_logp"] for h in halves) / 2 < want["mismatch_max_abs_logp"] - 0.1  # the old mean
    assert abs(sum(h["mismatch_kl"] for h in halves) / 2 - want["mismatch_kl"]) > 1e-4
