"""Helpers for the adapter tests: small-vocab tiny models, a fixed batch, random (non-zero) adapters."""

import torch

from tunelab.adapters import base
from tunelab.models.tiny import tiny_model

VOCAB = 128


def make(arch="llama", seed=0):
    model = tiny_model(arch, seed=seed, vocab_size=VOCAB)
    return model.eval()


def batch(seed=1, b=2, t=9):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (b, t), generator=g)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def perturb(model, seed=2, scale=0.05):
    """Give every adapter parameter a random value so outputs differ from the base (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in base.adapter_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def train(model, ids, steps=10, lr=2e-2):
    """A plain LM step loop (next-token CE over the whole sequence, AdamW); returns the losses."""
    import torch.nn.functional as F

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        out = model(input_ids=ids).logits[:, :-1]
        loss = F.cross_entropy(out.reshape(-1, out.size(-1)), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses
