"""Linear assignment (the Hungarian step) on the CPU, optionally on worker threads.

Convention shared by every matcher: `similarity[i, j]` scores unit i of the reference
(model_a) against unit j of the other net (model_b). The returned `perm` puts unit
`perm[i]` of model_b in slot i, the spec's index_select convention.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from typing import Hashable, Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from tqdm.auto import tqdm


def solve_assignment(similarity: torch.Tensor, blocks: int = 1) -> torch.Tensor:
    """The permutation maximising `sum_i similarity[i, perm[i]]` (float64, CPU, scipy).

    blocks > 1: units stay within their block of `n / blocks` consecutive units (attention heads), so each
    diagonal block is its own, smaller assignment."""
    s = similarity.detach().to("cpu", torch.float64).numpy()
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"similarity must be a square matrix, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("similarity matrix has NaN or infinite entries; are the activations or weights finite?")
    width = len(s) // blocks
    cols = []
    for b in range(blocks):
        block = slice(b * width, (b + 1) * width)
        rows, c = linear_sum_assignment(s[block, block], maximize=True)
        assert (rows == np.arange(len(rows))).all()
        cols.append(c + b * width)
    return torch.from_numpy(np.concatenate(cols)).long()


def solve_coupled(similarities, blocks: int) -> list[torch.Tensor]:
    """Permutations of several blocked groups that move whole blocks alike (one attention layer's heads).

    Block j of the other net goes to slot-block i for every group at once: block pairs are scored by the
    summed value of each group's best within-block assignment, the block map is the assignment maximising
    that score, and each group's units are then assigned within the chosen block pairs (exact for this
    two-level structure: the objective is separable once the block map is fixed)."""
    mats = [s.detach().to("cpu", torch.float64).numpy() for s in similarities]
    width = mats[0].shape[0] // blocks
    inner: dict = {}
    score = np.zeros((blocks, blocks))
    for i in range(blocks):
        for j in range(blocks):
            for k, s in enumerate(mats):
                sub = s[i * width:(i + 1) * width, j * width:(j + 1) * width]
                rows, cols = linear_sum_assignment(sub, maximize=True)
                inner[k, i, j] = cols
                score[i, j] += sub[rows, cols].sum()
    _, block_map = linear_sum_assignment(score, maximize=True)
    return [torch.from_numpy(np.concatenate([inner[k, i, block_map[i]] + block_map[i] * width
                                             for i in range(blocks)])).long() for k in range(len(mats))]


def matched_similarity(similarity: torch.Tensor, perm: torch.Tensor) -> float:
    """`sum_i similarity[i, perm[i]]`: the matching objective of one group."""
    idx = torch.arange(len(perm), device=similarity.device)
    return float(similarity[idx, perm.to(similarity.device)].double().sum())


class AssignmentSolver:
    """Solves assignments on worker threads; scipy releases the GIL, so the solves overlap with
    whatever the caller does next on the device (computing the next group's similarity).

    with AssignmentSolver() as solver:
        for g in groups: solver.submit(g, similarity_of(g))
    perms = solver.results()
    """

    def __init__(self, max_workers: int | None = None):
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="hungarian")
        self._futures: dict[Hashable, Future] = {}
        self._coupled: dict[tuple, Future] = {}   # names -> one future giving their permutations in order

    def submit(self, name: Hashable, similarity: torch.Tensor, blocks: int = 1) -> None:
        # The device->host copy happens here, on the caller's thread, so workers never touch the device.
        s = similarity.detach().to("cpu", torch.float64)
        self._futures[name] = self._pool.submit(solve_assignment, s, blocks)

    def submit_coupled(self, names: tuple, similarities, blocks: int) -> None:
        """Groups whose blocks move together (`solve_coupled`); `results()` gives each name its permutation."""
        mats = [s.detach().to("cpu", torch.float64) for s in similarities]
        self._coupled[names] = self._pool.submit(solve_coupled, mats, blocks)

    def results(self) -> dict[Hashable, torch.Tensor]:
        """Wait for every solve; on a terminal, a bar counts them once the wait passes 2 s (n = 8192: minutes)."""
        futures = [*self._futures.values(), *self._coupled.values()]
        for _ in tqdm(as_completed(futures), total=len(futures), desc="hungarian", leave=False, delay=2.0,
                      disable=None):
            pass
        out = {name: f.result() for name, f in self._futures.items()}
        for names, f in self._coupled.items():
            out.update(zip(names, f.result()))
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "AssignmentSolver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def solve_assignments(similarities: Mapping[str, torch.Tensor], max_workers: int | None = None,
                      blocks: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
    """One independent assignment per group, solved concurrently (`blocks`: group -> blocks, default 1)."""
    with AssignmentSolver(max_workers) as solver:
        for name, s in similarities.items():
            solver.submit(name, s, (blocks or {}).get(name, 1))
        return solver.results()
