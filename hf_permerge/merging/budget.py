"""What a streamed merge needs before it starts: memory and disk, estimated, printed, and refused in one line when
the machine has less, naming the setting that lowers it."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import psutil

from ..alignment.spec import PermutationSpec

GiB = 2**30
BASE_MEMORY = 1.25 * GiB
"""Python, torch and transformers loaded, and the two-layer copy traced for the spec (a 1.1B-shaped LLaMA: 1.2 GB)."""
SOLVE_BYTES_PER_ENTRY = 36
"""Bytes per entry of a group's n x n similarity while it is solved: float32 (4), its float64 copy for SciPy (8),
the warm start's transpose and buffer (4 + 4), the reduced cost matrix (8) and SciPy's own copy of it (8)."""


def size_text(nbytes: float) -> str:
    """Bytes in the largest unit that keeps a digit before the point (5 MB reads 4.8 MiB, not 0.0 GiB)."""
    for unit, factor in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= factor:
            return f"{nbytes / factor:.1f} {unit}"
    return f"{int(nbytes)} bytes"


class NotEnoughResources(RuntimeError):
    """The machine has less memory or disk than the job needs; raised before any work."""


@dataclass(frozen=True)
class Needs:
    memory: int
    disk: int
    largest_group: int
    largest_tensor: int
    solve: int

    def describe(self) -> str:
        return (
            f"streamed merge needs about {size_text(self.memory)} of memory (largest group "
            f"{self.largest_group} units, largest tensor {size_text(self.largest_tensor)}) and "
            f"{size_text(self.disk)} of disk"
        )


def estimate(spec: PermutationSpec, sizes: dict[str, int], chunk_elements: int, statistics: int | None = None) -> Needs:
    """Peak memory and the output's size on disk. `sizes`: every tensor's bytes as stored.

    Weight matching holds one group's similarity and, while it accumulates, one tensor of each model, b's permuted
    copy and a float32 chunk per side; solving holds the similarity's copies (`SOLVE_BYTES_PER_ENTRY`). Activation
    matching (`statistics`: its bound in bytes) holds one pass's statistics, each model's largest layer in float32
    (`layer_bytes`) and a solve. Merging holds a tensor of each model, b's permuted copy, the output and three
    float32 chunks."""
    n = max((g.size for g in spec.groups), default=0)
    largest = max(sizes.values(), default=0)
    chunk = 4 * chunk_elements
    if statistics is None:
        matching = max(SOLVE_BYTES_PER_ENTRY * n * n, 4 * n * n + 3 * largest + 2 * chunk)
    else:
        matching = statistics + SOLVE_BYTES_PER_ENTRY * n * n + 2 * layer_bytes(sizes)
    merging = 4 * largest + 3 * chunk
    solve = SOLVE_BYTES_PER_ENTRY * n * n
    return Needs(int(BASE_MEMORY + max(matching, merging)), sum(sizes.values()), n, largest, solve)


def check_resources(needs: Needs, output_dir: Path, chunk_elements: int, max_statistics_mb: int | None = None) -> None:
    """Refuse (`NotEnoughResources`, one line) when available memory or the output disk's free space is short;
    `max_statistics_mb`: the activation matcher's bound, the setting to lower then."""
    available = psutil.virtual_memory().available
    if needs.memory > available:
        lower = (
            f"max_statistics_mb (now {max_statistics_mb}) to gather the activation statistics in more passes"
            if max_statistics_mb is not None
            else f"chunk_elements (now {chunk_elements}) to hold less of each tensor at once"
        )
        raise NotEnoughResources(
            f"{needs.describe()}, but only {size_text(available)} of memory is available; lower {lower} "
            f"(solving the largest group alone takes {size_text(needs.solve)}), or free memory"
        )
    parent = next(p for p in [output_dir, *output_dir.parents] if p.exists())
    free = shutil.disk_usage(parent).free
    if needs.disk > free:
        raise NotEnoughResources(
            f"{needs.describe()}, but {parent} has only {size_text(free)} free; choose an output folder "
            "on a disk with more space (output_dir)"
        )


def layer_bytes(sizes: dict[str, int]) -> int:
    """The largest layer's weights in float32 (as a forward computes), a layer being the tensors whose names agree
    up to the first number (`model.layers.7.`); a tensor outside the stack (embeddings, head) is a layer alone."""
    layers: dict[str, int] = {}
    for name, nbytes in sizes.items():
        parts = name.split(".")
        cut = next((i for i, p in enumerate(parts) if p.isdigit()), len(parts) - 1)
        key = ".".join(parts[: cut + 1])
        layers[key] = layers.get(key, 0) + nbytes
    return 2 * max(layers.values(), default=0)  # bf16 bytes doubled (a float32 checkpoint: an overestimate)
