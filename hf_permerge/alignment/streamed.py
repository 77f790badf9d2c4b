"""Weight matching over tensors read on demand (a checkpoint on disk): memory bounded by the largest group.

The same objective and coordinate descent as `solve_linear_matching`; each group's similarity is accumulated in
float32 from the tensors that group touches, read one at a time from the two mappings (`shards.ShardedTensors`
reads them from their safetensors shards), a bounded chunk converted at a time. Neither model is ever held whole.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .hungarian import objective_summary
from .permutations import Permutations
from .spec import PermutationSpec
from .weight import coordinate_descent, group_similarity

CHUNK_ELEMENTS = 2**23
"""Float32 entries converted at once per side (32 MiB): a tensor's columns are read into the similarity this many
at a time, whatever its size."""


def chunk_columns(units: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    return max(1, chunk_elements // units)


def match_streamed(
    spec: PermutationSpec,
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    max_iter: int = 100,
    seed: int = 0,
    bottom_up: bool = True,
    chunk_elements: int = CHUNK_ELEMENTS,
    progress: bool = False,
) -> Permutations:
    """Permutations of b's units onto a's maximising  sum_k <a[k], pi(b)[k]>  (weight matching), reading each
    tensor from `a` and `b` when a group needs it. Settings as `WeightMatcher`'s; `info["groups"]` holds each
    group's objective at the identity and at the permutation found."""

    def similarity(group, perms, solved):
        columns = chunk_columns(spec[group].size, chunk_elements)
        return group_similarity(spec, group, [(a, b)], perms, solved, torch.float32, columns)

    perms, groups = coordinate_descent(
        spec, similarity, max_iter, seed, bottom_up, keep=objective_summary, progress=progress
    )
    settings = {"max_iter": max_iter, "seed": seed, "bottom_up": bottom_up, "streamed": True}
    return Permutations(perms, {"matcher": "weight", "settings": settings, "data": None, "groups": groups})


def objective(perms: Permutations) -> float:
    """The summed objective of the permutations found (every group at the final permutations)."""
    return sum(g["similarity_matched"] for g in perms.info["groups"].values())
