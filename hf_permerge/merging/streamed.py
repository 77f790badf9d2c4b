"""Align and merge two checkpoints on disk without loading either: tensors are read from their shards as needed,
the merge is written shard by shard in the input dtype.

    from hf_permerge.merging.streamed import merge_streamed
    merge_streamed("models/a", "models/b", "models/merged")   # (1 - alpha) A + alpha pi(B), alpha = 0.5

Memory is bounded by the largest group (its n x n similarity) and the largest tensor, not by the models
(`budget.estimate`, checked before the matching starts). The output folder appears whole or not at all: it is written in a
staging folder beside it and renamed on success (a kill leaves no output), and `overwrite` keeps the old output
until then.
"""

from __future__ import annotations

import functools
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..alignment.permutations import Permutations
from ..alignment.spec import PermutationSpec, permute_tensor
from ..alignment.streamed import CHUNK_ELEMENTS, match_streamed
from ..io_utils import PYTHON_WORDING, atomic_dir, check_outside_inputs, folder_job, write_json_atomic
from ..models.folders import load_config, non_finite_error
from ..shards import INDEX_NAME, ShardedTensors, ShardWriter
from .budget import check_resources, estimate
from .checkpoint_spec import checkpoint_spec
from .nets import check_same_architecture
from .offloaded import match_activations_offloaded
from .saving import MARKER, check_save_target
from .tokenizers import compare_tokenizers

_NOT_COPIED = {INDEX_NAME, MARKER, "README.md", "aligned_to.json"}


def check_same_tensors(a: ShardedTensors, b: ShardedTensors) -> None:
    """Refuse checkpoints whose tensors differ in name, shape or dtype, naming the first difference and its file."""
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            has, lacks = (a, b) if name in a else (b, a)
            raise ValueError(
                f"{name} is missing from {lacks.file_of(name)} ({has.folder / has.shard_of[name]} holds it); the "
                "checkpoints must hold the same tensors: save or download the model again"
            )
        if a.meta(name) != b.meta(name):
            raise ValueError(
                f"{name} is {a.meta(name)} in {a.folder / a.shard_of[name]} but {b.meta(name)} in "
                f"{b.folder / b.shard_of[name]}; the checkpoints must be of one architecture"
            )


def merged_tensor(spec, name: str, a: torch.Tensor, b: torch.Tensor, perms, alpha: float, chunk: int) -> torch.Tensor:
    """(1 - alpha) a + alpha pi(b) in float32, `chunk` entries at a time, returned in a's dtype."""
    if not a.is_floating_point():
        return a
    b = permute_tensor(spec, name, b, perms).reshape(-1)
    out = torch.empty_like(a)
    flat_a, flat_out = a.reshape(-1), out.view(-1)
    for i in range(0, flat_a.numel(), chunk):
        part = slice(i, i + chunk)
        flat_out[part] = torch.lerp(flat_a[part].float(), b[part].float(), alpha)
    return out


def first_non_finite(*sources: ShardedTensors) -> None:
    """Raise `non_finite_error` for the first floating tensor of the sources holding NaN or inf (none: return)."""
    for source in sources:
        for name in source:
            t = source[name]
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise non_finite_error(name, source.file_of(name)) from None


def write_merge(
    spec, source_a, source_b, perms, folder: Path, alpha: float, chunk: int, max_shard_size, progress: bool
) -> None:
    """The merged tensors, shard by shard, into `folder`."""
    layout = {name: source_a.meta(name) for name in source_a}
    with ShardWriter(folder, layout, max_shard_size) as writer:
        for name in tqdm(list(source_a), desc="merge", leave=False, disable=not progress):
            a, b = source_a[name], source_b[name]
            for source, t in ((source_a, a), (source_b, b)):  # one no group reads (a norm), or at alpha's ends
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise non_finite_error(name, source.file_of(name))
            writer.write(name, merged_tensor(spec, name, a, b, perms, alpha, chunk))


def merge_streamed(
    a,
    b,
    output_dir,
    alpha: float = 0.5,
    *,
    max_iter: int = 100,
    seed: int = 0,
    bottom_up: bool = True,
    chunk_elements: int = CHUNK_ELEMENTS,
    max_shard_size: int | str = "5GB",
    spec: PermutationSpec | None = None,
    matcher: str = "weight",
    data=None,
    max_statistics_mb: int | None = 2048,
    activation_settings: dict | None = None,
    overwrite: bool = False,
    allow_different_tokenizers: bool = False,
    progress: bool = True,
    log=print,
) -> Path:
    """Align checkpoint folder `b` onto `a` and write `(1 - alpha) A + alpha pi(B)` to `output_dir`.

    Both are read lazily from their safetensors shards; the spec is traced on a two-layer copy of a's config
    (`checkpoint_spec`) unless given. matcher "weight" (default) reads each tensor when a group needs it;
    "activation" runs both models over `data` (a `TokenSplit`) one layer at a time from disk
    (`offloaded.match_activations_offloaded`), its statistics gathered in passes of at most `max_statistics_mb`
    (`activation_settings`: the matcher's other settings). The output holds the merged shards (a's dtype,
    `max_shard_size` each, the index as `save_pretrained` writes it), a's other files (config, generation config,
    tokenizer), the permutations (`permutations/net_1.safetensors`) and `merge_config.json`. Memory and disk are
    estimated and printed (`log`) once the spec is known (seconds); a machine with less is refused
    (`budget.NotEnoughResources`) before the matching starts.
    """
    if matcher not in ("weight", "activation"):
        raise ValueError(f"matcher={matcher!r}: a streamed merge aligns by 'weight' or 'activation' matching")
    if matcher == "activation" and data is None:
        raise ValueError("matcher='activation' reads activations: pass data (a TokenSplit of the models' tokens)")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
    a, b = Path(a), Path(b)
    check_outside_inputs(output_dir, [a, b], overwrite, PYTHON_WORDING)
    check = functools.partial(check_save_target, output_dir, overwrite)
    output_dir = check()
    with folder_job(output_dir, check, overwrite) as (out, _):  # locked before any work: one writer at a time
        configs = [load_config(a), load_config(b)]  # refuses a folder naming code, before anything reads it
        source_a, source_b = ShardedTensors(a), ShardedTensors(b)
        check_same_architecture(configs, [str(a), str(b)])
        tokenizers_differ = compare_tokenizers([a, b], [a.name, b.name], allow_different_tokenizers)
        check_same_tensors(source_a, source_b)
        started = time.perf_counter()
        if spec is None:
            spec, _ = checkpoint_spec(configs[0], source_a.shapes())
        else:
            spec.validate(source_a.shapes())
        sizes = {n: source_a.nbytes(n) for n in source_a}
        statistics = None if matcher == "weight" else (max_statistics_mb or 0) * 2**20 or None
        needs = estimate(spec, sizes, chunk_elements, statistics)
        log(needs.describe())
        check_resources(needs, output_dir, chunk_elements, max_statistics_mb if matcher == "activation" else None)
        try:
            if matcher == "weight":
                perms = match_streamed(
                    spec,
                    source_a,
                    source_b,
                    max_iter,
                    seed,
                    bottom_up,
                    chunk_elements=chunk_elements,
                    progress=progress,
                )
            else:
                perms = match_activations_offloaded(a, b, data, spec, max_statistics_mb, **(activation_settings or {}))
        except ValueError:  # a cost matrix of NaN or inf: name the tensor that holds them, found only now
            first_non_finite(source_a, source_b)
            raise
        aligned = time.perf_counter()
        with atomic_dir(out) as tmp:
            write_merge(spec, source_a, source_b, perms, tmp, float(alpha), chunk_elements, max_shard_size, progress)
            for f in a.iterdir():
                if (
                    f.is_file()
                    and not f.name.startswith(".")
                    and f.suffix not in (".safetensors", ".py")
                    and f.name not in _NOT_COPIED
                ):
                    shutil.copy2(f, tmp / f.name)
            (tmp / "permutations").mkdir()
            Permutations({g.name: torch.arange(g.size) for g in spec.groups}).save(
                tmp / "permutations" / "net_0.safetensors"
            )
            perms.save(tmp / "permutations" / "net_1.safetensors")
            write_json_atomic(
                tmp / MARKER,
                {
                    "format": "hf_permerge.merge/1",
                    "sources": [a.name, b.name],
                    "merge": {"alpha": float(alpha), "nets": [0, 1], "permuted": True, "streamed": True},
                    "alignment": {"matcher": matcher, "settings": perms.info["settings"], "groups": len(spec.groups)},
                    **({"tokenizers_differ": tokenizers_differ} if tokenizers_differ else {}),
                    "timings_s": {"align": aligned - started, "merge": time.perf_counter() - aligned},
                },
            )
    return output_dir
