"""Linear assignment (the Hungarian step) on the CPU, optionally on worker threads.

Convention shared by every matcher: `similarity[i, j]` scores unit i of the reference
(model_a) against unit j of the other net (model_b). The returned `perm` puts unit
`perm[i]` of model_b in slot i, the spec's index_select convention.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Hashable, Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def solve_assignment(similarity: torch.Tensor) -> torch.Tensor:
    """The permutation maximising `sum_i similarity[i, perm[i]]` (float64, CPU, scipy)."""
    s = similarity.detach().to("cpu", torch.float64).numpy()
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"similarity must be a square matrix, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("similarity matrix has NaN or infinite entries; are the activations or weights finite?")
    rows, cols = linear_sum_assignment(s, maximize=True)
    assert (rows == np.arange(len(rows))).all()
    return torch.from_numpy(cols).long()


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

    def submit(self, name: Hashable, similarity: torch.Tensor) -> None:
        # The device->host copy happens here, on the caller's thread, so workers never touch the device.
        s = similarity.detach().to("cpu", torch.float64)
        self._futures[name] = self._pool.submit(solve_assignment, s)

    def results(self) -> dict[Hashable, torch.Tensor]:
        """Wait for every solve; on a terminal, a bar counts them once the wait passes 2 s (n = 8192: minutes)."""
        from concurrent.futures import as_completed

        from tqdm.auto import tqdm

        for _ in tqdm(as_completed(self._futures.values()), total=len(self._futures), desc="hungarian",
                      leave=False, delay=2.0, disable=None):
            pass
        return {name: f.result() for name, f in self._futures.items()}

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "AssignmentSolver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def solve_assignments(similarities: Mapping[str, torch.Tensor], max_workers: int | None = None
                      ) -> dict[str, torch.Tensor]:
    """One independent assignment per group, solved concurrently."""
    with AssignmentSolver(max_workers) as solver:
        for name, s in similarities.items():
            solver.submit(name, s)
        return solver.results()
