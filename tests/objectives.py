"""What two matchings must share when they come from different solvers or code paths: their objective.

Where units tie exactly (dead units, duplicated units), several permutations reach the same optimum, and
which one a solver returns depends on its start, the order of its columns and the last bits of the floats
(thread count, instruction set). Tests that compare two code paths compare these objectives, to a
tolerance; permutations are compared only where the optimum is unique by construction (a net matched with
a permuted copy of itself).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from hf_permerge.alignment import Permutations, get_matcher


def activation_objective(model_a, model_b, perms: Permutations, data, **settings) -> float:
    """The summed similarity of the units `perms` puts side by side, measured afresh by the activation matcher
    (`similarity_identity` of `model_a` against `perms.apply(model_b)`), over every group."""
    info = get_matcher("activation", **settings).match(model_a, perms.apply(model_b), data).info
    return sum(g["similarity_identity"] for g in info["groups"].values())


def weight_objective(model_a, model_b, perms: Permutations) -> float:
    """Weight matching's objective: the inner product of every tensor the spec permutes, after `perms`."""
    spec = model_a.permutation_spec()
    sa, sb = model_a.state_dict(), perms.apply(model_b).state_dict()
    return sum(torch.sum(sa[k].double() * sb[k].double()).item() for k in spec.axes_to_perm() if k in sa)


def objective(matcher: str, model_a, model_b, perms: Permutations, data=None, **settings) -> float:
    if matcher == "activation":
        return activation_objective(model_a, model_b, perms, data, **settings)
    if matcher == "weight":
        return weight_objective(model_a, model_b, perms)
    raise ValueError(f"no objective for matcher {matcher!r} here")


def summed_objective(matcher: str, models, perms: list[Permutations], data=None, **settings) -> float:
    """The N-net objective: `objective` of every pair of permuted nets, summed (what the joint alignments raise)."""
    permuted = [p.apply(m) for m, p in zip(models, perms)]
    identity = Permutations.identity(models[0].permutation_spec())
    return sum(
        objective(matcher, permuted[i], permuted[j], identity, data, **settings)
        for i, j in itertools.combinations(range(len(models)), 2)
    )


def assert_equally_good(found: float, expected: float, rel: float = 1e-6) -> None:
    """Two optima of the same problem: equal objectives, up to float rounding of their statistics."""
    assert found == pytest.approx(expected, rel=rel, abs=1e-9)
