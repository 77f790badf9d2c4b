"""Aligning N nets with each other instead of each onto net 0.

Aligning every net onto net 0 (a star) makes each permutation as good as possible for one pair, but the
uniform average of N nets is built from all pairs: nets 1 and 2 are lined up only through net 0. Both
functions here maximise the matcher's objective summed over all pairs of nets, by rounds of coordinate
ascent from the star alignment: one net at a time, the others held fixed, a permutation is taken only if
it raises the objective, until a round changes nothing.

- Weight matching (`align_to_average`, Git Re-Basin's MergeMany): the weights' inner product is linear, so
  matching net i to the average of the others is matching it to all of them at once.
- Activation matching (`align_activations_jointly`): an averaged net's activations are not the average of
  its sources' activations (and are a poor reference: measured), so the similarity of every pair of nets is
  computed once and each net's unit-to-slot cost is the sum of its similarities to the other nets' units
  in each slot.

The result is re-anchored so that net 0 stays as it is, which changes no merge: permuting every net alike
permutes their average, the same function.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .activation import matching_inputs, pairwise_activation_statistics
from .base import check_matching_data, model_device
from .hungarian import AssignmentSolver, matched_similarity, solve_assignment
from .permutations import Permutations

REFERENCES = ("net_0", "average")
"""What `PermMerger.align(reference=...)` aligns the nets onto: net 0 (the paper's), or the others' average."""


def average_of(models: list[nn.Module]) -> nn.Module:
    """A copy of models[0] holding the uniform average of the models' floating-point tensors."""
    states = [m.state_dict() for m in models]
    out = copy.deepcopy(models[0])
    out.load_state_dict(
        {k: (sum(s[k] for s in states) / len(states)) if t.is_floating_point() else t for k, t in states[0].items()}
    )
    return out


def _inner(a: nn.Module, b: nn.Module, keys) -> float:
    """Weight matching's objective: the inner product of two nets' tensors that the spec permutes."""
    sa, sb = a.state_dict(), b.state_dict()
    return sum(torch.sum(sa[k].double() * sb[k].double()).item() for k in keys)


def _match(matcher, reference: nn.Module, permuted: nn.Module, data, perm: Permutations, warm: dict) -> Permutations:
    """`matcher.match(reference, permuted, data)` (the weight matcher), warm-started from this net's last solves.
    The match's columns are the permuted net's units, unit k being the net's own unit perm[g][k]; `warm` keeps the
    potentials by the net's own units, which do not move between rounds."""
    potentials = {g: {"columns": v[perm[g].to(v.device)]} for g, v in warm.items()}
    match = matcher.match(reference, permuted, data, potentials=potentials)
    for g, carried in potentials.items():
        if "columns" in carried:
            v = torch.empty_like(carried["columns"])
            v[perm[g].to(v.device)] = carried["columns"]
            warm[g] = v
    return match


def align_to_average(
    models: list[nn.Module],
    matcher,
    data=None,
    start: list[Permutations] | None = None,
    max_rounds: int = 50,
    tolerance: float = 1e-9,
) -> tuple[list[Permutations], dict]:
    """Weight matching of N nets with each other (MergeMany): one `Permutations` per net lining it up with the
    average of the other nets; net 0's is the identity.

    `matcher`: the weight matcher (its settings) that matches a net to the others' average. `start`: the
    permutations to begin from (e.g. the star alignment onto net 0; default: identities). A round matches
    nets 0..N-1 in order, each against the average of the others as permuted so far, and takes the
    permutation found only when it raises the net's inner product with that average by more than `tolerance`
    (relative); the inner product being linear, the objective summed over all pairs of nets rises with every
    change, so rounds end when one changes nothing (at most `max_rounds`). Returns (permutations,
    {"rounds", "converged"}); each permutation's `info` is its last match's (similarities to the others' average).
    """
    if len(models) < 2:
        raise ValueError("aligning onto an average needs at least two nets")
    if max_rounds < 1:
        raise ValueError(f"max_rounds={max_rounds} must be >= 1")
    spec = models[0].permutation_spec()
    keys = [k for k in spec.axes_to_perm() if k in models[0].state_dict()]
    perms = list(start) if start is not None else [Permutations.identity(spec) for _ in models]
    permuted = [p.apply(m, spec) for p, m in zip(perms, models)]
    warm = [{} for _ in models]  # net -> group -> its last column potentials, indexed by the net's own units
    rounds, converged = 0, False
    changes, changed_at, solved_at = 0, [0] * len(models), [-1] * len(models)
    with torch.no_grad():
        while rounds < max_rounds and not converged:
            rounds += 1
            converged = True
            for i in range(len(models)):
                if all(changed_at[j] <= solved_at[i] for j in range(len(models))):
                    continue  # no net (itself included: a matcher stopped by max_iter may go on
                    # from where it stopped) moved since: the same match would be found
                solved_at[i] = changes
                reference = average_of([permuted[j] for j in range(len(models)) if j != i])
                match = _match(matcher, reference, permuted[i], data, perms[i], warm[i])
                found = Permutations(match.compose(perms[i]), match.info)
                candidate = found.apply(models[i], spec)
                current = _inner(reference, permuted[i], keys)
                if _inner(reference, candidate, keys) - current > tolerance * max(1.0, abs(current)):
                    converged = False
                    perms[i], permuted[i] = found, candidate
                    changes += 1
                    changed_at[i] = changes
    anchor = perms[0].inverse()
    anchored = [Permutations.identity(spec)]
    for p in perms[1:]:  # the per-group similarities of the matches were against an average: not kept
        info = {k: v for k, v in p.info.items() if k != "groups"}
        anchored.append(Permutations(anchor.compose(p), {**info, "reference": "average of the other nets"}))
    return anchored, {"rounds": rounds, "converged": converged}


def align_activations_jointly(
    models: list[nn.Module],
    matcher,
    data,
    start: list[Permutations] | None = None,
    max_rounds: int = 50,
    tolerance: float = 1e-9,
) -> tuple[list[Permutations], dict]:
    """Activation matching of N nets with each other: maximise, over the permutations of nets 1..N-1 and every
    group, the similarity of the units sharing a slot summed over all pairs of nets.

    One pass over the data for all pairs of nets (`pairwise_activation_statistics`), then only assignments; the
    similarity matrices are kept on the CPU (N (N-1) / 2 x groups x width^2 floats). Settings are `matcher`'s
    (similarity, preactivation, num_examples, seed, products). `start`: the permutations to begin from; None:
    the paper's star alignment onto net 0, solved from the pairs with net 0 computed here anyway (what
    `matcher.match_many` finds, up to the rounding of other batch sizes). Returns like `align_to_average`.
    """
    if max_rounds < 1:
        raise ValueError(f"max_rounds={max_rounds} must be >= 1")
    spec = models[0].permutation_spec()
    if spec.couplings:
        raise ValueError(
            "aligning onto the average with activations does not handle attention heads (coupled "
            "groups) yet; use reference='net_0', or the weight matcher"
        )
    check_matching_data(data, models[0])
    split = data.subset(matcher.num_examples, matcher.seed).to(model_device(models[0]))
    n = len(models)
    sims = {}  # (i, j, group), i < j -> similarity[unit of i, unit of j], CPU float32
    to_net_0 = [{} for _ in range(n)]  # the star's similarities, as `match_many` solves them (until solved)
    stats = pairwise_activation_statistics(
        models, matching_inputs(split), spec, matcher.preactivation, matcher.batch_size, matcher.products
    )
    with AssignmentSolver() as solver:
        for (i, j), pair in stats.items():
            for g in spec.names:
                similarity = pair.pop(g).similarity(matcher.similarity)
                sims[i, j, g] = similarity.to("cpu", torch.float32)
                if i == 0 and start is None:
                    to_net_0[j][g] = similarity
                    solver.submit((j, g), similarity, spec[g].blocks, spec[g].rigid_runs)
        solved = solver.results()
    del stats
    if start is None:
        start = [Permutations.identity(spec)]
        for j in range(1, n):
            found = {g: solved[j, g] for g in spec.names}
            start.append(Permutations(found, matcher._info(to_net_0[j], found, split)))
    del to_net_0
    perms = [{g: p[g].clone() for g in spec.names} for p in start]

    def cost(i: int, g: str) -> torch.Tensor:
        """[slot, unit of net i]: the unit's similarity to the other nets' units in that slot, summed. Row gathers
        of contiguous matrices (a net j < i: slots index its rows) and column gathers added transposed once
        (j > i): 2x faster than gathering every term's columns."""
        rows = torch.zeros(sims[0, 1, g].shape, dtype=torch.float64)
        cols = torch.zeros_like(rows)
        for j in range(n):
            if j < i:
                rows.add_(sims[j, i, g].index_select(0, perms[j][g]))
            elif j > i:
                cols.add_(sims[i, j, g].index_select(1, perms[j][g]))
        return rows.add_(cols.T)

    rounds, converged = 0, False
    changes = 0
    potentials = {(i, g): {} for i in range(n) for g in spec.names}  # columns: net i's units, whatever moves
    changed_at = {(i, g): 0 for i in range(n) for g in spec.names}
    solved_at = {(i, g): -1 for i in range(n) for g in spec.names}
    while rounds < max_rounds and not converged:
        rounds += 1
        converged = True
        for i in range(n):
            for g in spec.names:
                if all(changed_at[j, g] <= solved_at[i, g] for j in range(n) if j != i):
                    continue  # the other nets' units in this group have not moved since
                solved_at[i, g] = changes
                c = cost(i, g)
                found = solve_assignment(c, spec[g].blocks, previous=potentials[i, g], rigid=spec[g].rigid_runs)
                current = matched_similarity(c, perms[i][g])
                if matched_similarity(c, found) - current > tolerance * max(1.0, abs(current)):
                    converged = False
                    perms[i][g] = found
                    changes += 1
                    changed_at[i, g] = changes
    anchor = Permutations(perms[0]).inverse()
    out = [Permutations.identity(spec)]
    for i in range(1, n):
        p = anchor.compose(Permutations(perms[i]))
        groups = {
            g: {
                "similarity_identity": matched_similarity(sims[0, i, g], torch.arange(len(p[g]))),
                "similarity_matched": matched_similarity(sims[0, i, g], p[g]),
            }
            for g in spec.names
        }
        out.append(
            Permutations(
                p, {**start[i].info, "groups": groups, "reference": "all other nets (summed pairwise similarity)"}
            )
        )
    return out, {"rounds": rounds, "converged": converged}
