"""Linear assignment (the Hungarian step) on the CPU, optionally on worker threads.

Convention shared by every matcher: `similarity[i, j]` scores unit i of the reference
(model_a) against unit j of the other net (model_b). The returned `perm` puts unit
`perm[i]` of model_b in slot i, the spec's index_select convention.

Warm start: SciPy's solver spends most of its time finding dual potentials. Subtracting row and column
constants leaves the optimal assignment unchanged, so good potentials are first estimated where the
similarity lives (annealed log-domain Sinkhorn) and SciPy solves the reduced matrix `u_i + v_j - s_ij`
exactly: the same assignment, found faster (BENCHMARKS.md, "Alignment").
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, as_completed

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from tqdm.auto import tqdm

WARM_STARTS = ("auto", "sinkhorn", "none")
WARM_START_MIN_UNITS = {"cuda": 512, "cpu": 2048}
"""'auto' warm-starts groups at least this wide, by the similarity's device: the width from which the
potentials cost less than they save (milliseconds on a GPU; on a CPU they break even near 1024 units)."""
SINKHORN_TEMPERATURES = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3)
"""Annealing schedule, in units of the similarity's range (max - min)."""
SINKHORN_ITERATIONS = {"cuda": 20, "cpu": 5}
"""Sinkhorn iterations per temperature, by device (10 elsewhere). More make SciPy's part shorter: on the
2-core CPU, n = 8192 took 5 + 10 s (potentials + SciPy) with 5, 12 + 9 s with 10 and 23 + 5 s with 20;
n = 2048: 0.4 + 0.7, 0.7 + 0.6, 1.1 + 0.4 s. On a GPU the potentials cost milliseconds, so it takes 20."""


def _soft_max_rows(mat: torch.Tensor, shift: torch.Tensor, t: float, buf: torch.Tensor) -> torch.Tensor:
    """t * log sum_j exp((mat[i, j] - shift[j]) / t) for every row i, in one preallocated n x n buffer."""
    torch.sub(mat, shift, out=buf).mul_(1.0 / t)
    top = buf.amax(1, keepdim=True)
    # exp of far-negative floats takes a slow path on CPUs (10x); below e^-80 nothing adds to the sum
    buf.sub_(top).clamp_(min=-80.0).exp_()
    return (buf.sum(1).log_() + top.squeeze(1)) * t


@torch.no_grad()
def entropic_duals(
    similarity: torch.Tensor, start: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Potentials (u, v) with u_i + v_j >= similarity[i, j] for all i, j, nearly tight on the best assignment.

    Log-domain Sinkhorn with unit marginals, annealed over `SINKHORN_TEMPERATURES` (`SINKHORN_ITERATIONS`
    each), on the similarity's device. After each update of v every column of exp((s - u - v) / t) sums to one, so no entry exceeds
    one: the potentials are feasible for the assignment's dual (up to float32 rounding; the exact solve
    that follows does not depend on it). None when the similarity is constant or not finite. Memory:
    three n x n float32 matrices (the similarity, its transpose, one buffer)."""
    s = similarity.detach().float()
    scale = float(s.max() - s.min())
    if not scale > 0 or not np.isfinite(scale):
        return None
    s_t, buf = s.T.contiguous(), torch.empty_like(s)
    iterations = SINKHORN_ITERATIONS.get(s.device.type, 10)
    u = torch.zeros(len(s), device=s.device)
    v = torch.zeros(s.shape[1], device=s.device)
    levels = SINKHORN_TEMPERATURES
    if start is not None and start.shape == v.shape and torch.isfinite(start).all():
        v, levels = start.to(v), SINKHORN_TEMPERATURES[-1:]
    for level in levels:
        t = level * scale
        for _ in range(iterations):
            u = _soft_max_rows(s, v, t, buf)
            v = _soft_max_rows(s_t, u, t, buf)
    if not (torch.isfinite(u).all() and torch.isfinite(v).all()):
        return None
    return u, v


def uses_warm_start(similarity: torch.Tensor, blocks: int = 1, warm_start: str = "auto") -> bool:
    """Whether `solve_assignment` warm-starts this matrix: 'sinkhorn' always (unblocked groups), 'none' never,
    'auto' for groups at least `WARM_START_MIN_UNITS` wide on their device."""
    if warm_start not in WARM_STARTS:
        raise ValueError(f"warm_start must be one of {WARM_STARTS}, got {warm_start!r}")
    if warm_start == "none" or blocks != 1 or similarity.ndim != 2:
        return False
    min_units = WARM_START_MIN_UNITS.get(similarity.device.type)
    return warm_start == "sinkhorn" or (min_units is not None and len(similarity) >= min_units)


def to_host(similarity: torch.Tensor, blocks: int = 1, warm_start: str = "auto", previous: dict | None = None):
    """(float64 CPU similarity, float64 CPU potentials or None): the potentials are computed on the
    similarity's device, on the caller's thread, so solver threads never touch the device."""
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be a square matrix, got shape {tuple(similarity.shape)}")
    duals = None
    if uses_warm_start(similarity, blocks, warm_start):
        duals = entropic_duals(similarity, None if previous is None else previous.get("columns"))
        if previous is not None and duals is not None:
            previous["columns"] = duals[1]
    s = similarity.detach().to("cpu", torch.float64)
    return s, None if duals is None else tuple(d.to("cpu", torch.float64) for d in duals)


def solve_on_host(s: torch.Tensor, blocks: int = 1, duals=None) -> torch.Tensor:
    """The exact assignment of a CPU float64 similarity; `duals` (u, v) only change how fast it is found."""
    s = s.numpy()
    if not np.isfinite(s).all():
        raise ValueError("similarity matrix has NaN or infinite entries; are the activations or weights finite?")
    if duals is not None:  # min sum (u_i + v_j - s_ij) = sum u + sum v - max sum s_ij: the same optimum
        cost, maximize = np.add.outer(duals[0].numpy(), duals[1].numpy()), False
        cost -= s
    else:
        cost, maximize = s, True
    width = len(cost) // blocks
    cols = []
    for b in range(blocks):
        block = slice(b * width, (b + 1) * width)
        rows, c = linear_sum_assignment(cost[block, block], maximize=maximize)
        assert (rows == np.arange(len(rows))).all()
        cols.append(c + b * width)
    return torch.from_numpy(np.concatenate(cols)).long()


def within_block(sub: np.ndarray, rigid: int = 0) -> tuple[np.ndarray, float]:
    """(cols, value): the best assignment of one diagonal or block-pair sub-matrix under a group's rigidity: free
    (rigid 0), the identity (rigid 1: the block keeps its order), or `rigid` runs of consecutive units moved as
    wholes, each scored by its sub-block's trace (the query heads of a grouped-query block)."""
    w = len(sub)
    if not rigid:
        rows, cols = linear_sum_assignment(sub, maximize=True)
        return cols, float(sub[rows, cols].sum())
    if rigid == 1:
        return np.arange(w), float(np.trace(sub))
    q = w // rigid
    traces = sub.reshape(rigid, q, rigid, q).diagonal(axis1=1, axis2=3).sum(-1)  # [a, b]: run b in run a's place
    rows, cols = linear_sum_assignment(traces, maximize=True)
    return (cols[:, None] * q + np.arange(q)).reshape(-1), float(traces[rows, cols].sum())


def solve_rigid(similarity: torch.Tensor, blocks: int, rigid: int) -> torch.Tensor:
    """A rigid group alone (without its coupling): its blocks stay, its runs move within them (`within_block`)."""
    s = similarity.detach().to("cpu", torch.float64).numpy()
    w = len(s) // blocks
    cols = [within_block(s[b * w : (b + 1) * w, b * w : (b + 1) * w], rigid)[0] + b * w for b in range(blocks)]
    return torch.from_numpy(np.concatenate(cols)).long()


def solve_assignment(
    similarity: torch.Tensor,
    blocks: int = 1,
    warm_start: str = "auto",
    previous: dict | None = None,
    rigid: bool = False,
) -> torch.Tensor:
    """The permutation maximising `sum_i similarity[i, perm[i]]` (exact: float64, CPU, SciPy).

    blocks > 1: units stay within their block of `n / blocks` consecutive units (attention heads), so each
    diagonal block is its own, smaller assignment. rigid (`PermGroup.rigid_runs`): True or 1, the units also keep
    their order within each block, so alone (without its coupling) the group's only permutation is the identity;
    r > 1, only whole runs of n / blocks / r units move within each block.
    warm_start: see the module docstring and `uses_warm_start`.
    previous: a dict kept by the caller between solves of one slowly changing matrix whose columns stay the same
    units (coordinate ascent); the warm start then begins from the last solve's column potentials, at the
    coldest temperature only. It changes how fast the optimum is found, never which."""
    if rigid:
        return torch.arange(len(similarity)) if int(rigid) == 1 else solve_rigid(similarity, blocks, int(rigid))
    s, duals = to_host(similarity, blocks, warm_start, previous)
    return solve_on_host(s, blocks, duals)


def solve_coupled(similarities, blocks: int, rigid=()) -> list[torch.Tensor]:
    """Permutations of several blocked groups that move whole blocks alike (one attention layer's heads).

    Block j of the other net goes to slot-block i for every group at once: block pairs are scored by the
    summed value of each group's best within-block assignment, the block map is the assignment maximising
    that score, and each group's units are then assigned within the chosen block pairs (exact for this
    two-level structure: the objective is separable once the block map is fixed). rigid[k]
    (`PermGroup.rigid_runs`): group k keeps its units' order within blocks, its block-pair score the trace of the
    sub-block, or (r > 1) moves whole runs within them (`within_block`)."""
    mats = [s.detach().to("cpu", torch.float64).numpy() for s in similarities]
    rigid = tuple(int(r) for r in rigid) + (0,) * (len(mats) - len(rigid))
    inner: dict = {}
    score = np.zeros((blocks, blocks))
    for i in range(blocks):
        for j in range(blocks):
            for k, s in enumerate(mats):
                w = s.shape[0] // blocks
                inner[k, i, j], value = within_block(s[i * w : (i + 1) * w, j * w : (j + 1) * w], rigid[k])
                score[i, j] += value
    _, block_map = linear_sum_assignment(score, maximize=True)
    return [
        torch.from_numpy(
            np.concatenate([inner[k, i, block_map[i]] + block_map[i] * (len(s) // blocks) for i in range(blocks)])
        ).long()
        for k, s in enumerate(mats)
    ]


def matched_similarity(similarity: torch.Tensor, perm: torch.Tensor) -> float:
    """`sum_i similarity[i, perm[i]]`: the matching objective of one group."""
    idx = torch.arange(len(perm), device=similarity.device)
    return float(similarity[idx, perm.to(similarity.device)].double().sum())


def objective_summary(similarity: torch.Tensor, perm: torch.Tensor) -> dict[str, float]:
    """One group's objective at the identity and at the permutation found (the `groups` entry of a header)."""
    return {
        "similarity_identity": matched_similarity(similarity, torch.arange(len(similarity))),
        "similarity_matched": matched_similarity(similarity, perm),
    }


class AssignmentSolver:
    """Solves assignments on worker threads; scipy releases the GIL, so the solves overlap with
    whatever the caller does next on the device (computing the next group's similarity).
    `warm_start` as in `solve_assignment`.

    with AssignmentSolver() as solver:
        for g in groups: solver.submit(g, similarity_of(g))
    perms = solver.results()
    """

    def __init__(self, max_workers: int | None = None, warm_start: str = "auto"):
        self.warm_start = warm_start
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="hungarian")
        self._futures: dict[Hashable, Future] = {}
        self._coupled: dict[tuple, Future] = {}  # names -> one future giving their permutations in order

    def submit(self, name: Hashable, similarity: torch.Tensor, blocks: int = 1, rigid: bool = False) -> None:
        if rigid:  # alone, a rigid group stays in place, or moves its runs (`solve_assignment`)
            self._futures[name] = self._pool.submit(solve_assignment, similarity.detach().cpu(), blocks, rigid=rigid)
            return
        # The warm start and the device->host copy happen here, on the caller's thread (see `to_host`).
        s, duals = to_host(similarity, blocks, self.warm_start)
        self._futures[name] = self._pool.submit(solve_on_host, s, blocks, duals)

    def submit_coupled(self, names: tuple, similarities, blocks: int, rigid=()) -> None:
        """Groups whose blocks move together (`solve_coupled`); `results()` gives each name its permutation."""
        mats = [s.detach().to("cpu", torch.float64) for s in similarities]
        self._coupled[names] = self._pool.submit(solve_coupled, mats, blocks, rigid)

    def results(self) -> dict[Hashable, torch.Tensor]:
        """Wait for every solve; on a terminal, a bar counts them once the wait passes 2 s (n = 8192: minutes)."""
        futures = [*self._futures.values(), *self._coupled.values()]
        for _ in tqdm(
            as_completed(futures), total=len(futures), desc="hungarian", leave=False, delay=2.0, disable=None
        ):
            pass
        out = {name: f.result() for name, f in self._futures.items()}
        for names, f in self._coupled.items():
            out.update(zip(names, f.result()))
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> AssignmentSolver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def solve_assignments(
    similarities: Mapping[str, torch.Tensor],
    max_workers: int | None = None,
    blocks: Mapping[str, int] | None = None,
    warm_start: str = "auto",
) -> dict[str, torch.Tensor]:
    """One independent assignment per group, solved concurrently (`blocks`: group -> blocks, default 1)."""
    with AssignmentSolver(max_workers, warm_start) as solver:
        for name, s in similarities.items():
            solver.submit(name, s, (blocks or {}).get(name, 1))
        return solver.results()
