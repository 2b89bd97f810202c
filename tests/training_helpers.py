"""Small training helpers shared by tests (importable because pytest's pythonpath includes tests/)."""

from __future__ import annotations

import torch


def fit_full_batch(model: torch.nn.Module, X, y, steps: int) -> torch.nn.Module:
    """Full-batch Adam on cross-entropy for ``steps`` steps; returns ``model`` in eval mode.

    Enough, on digits, for a good teacher (many steps) and a weaker student (few), in well under a
    second (conftest pins torch to one thread).
    """
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, t = torch.tensor(X), torch.tensor(y)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), t).backward()
        opt.step()
    return model.eval()


def worker_probe(x: int) -> tuple[int, int, int]:
    """For `distill.train.parallel` tests: ``(x * x, torch threads, process id)``; x < 0 raises."""
    import os

    if x < 0:
        raise ValueError(f"negative input {x}")
    return x * x, torch.get_num_threads(), os.getpid()
