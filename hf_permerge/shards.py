"""Model weights by name, on demand: read lazily from a folder's safetensors shards, written shard by shard.

Memory follows the tensors in flight, never the model: `ShardedTensors` opens a shard (`safe_open`, memory-mapped)
only when one of its tensors is asked for, and `ShardWriter` places each tensor at its offset in a shard laid out
beforehand from the names, shapes and dtypes, so tensors may be written one at a time, in any order.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


_REDOWNLOAD = "save or download the model again"


def read_header(path: Path) -> dict:
    """A safetensors file's header (name -> {dtype, shape, data_offsets}), checked against the file's size without
    reading any tensor; a truncated file, a header length or JSON that makes no sense is a ValueError naming the
    file and the fix."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if length is None or length > size - 8:
            raise ValueError(
                f"cannot read {path}: its header length ({length if length is not None else 'none'}) does not fit "
                f"in the file's {size} bytes (a truncated or damaged safetensors file); {_REDOWNLOAD}"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {path}: its header is not valid JSON ({err}); {_REDOWNLOAD}") from None
    if not isinstance(header, dict):
        raise ValueError(f"cannot read {path}: its header is not a JSON object; {_REDOWNLOAD}")
    header.pop("__metadata__", None)
    try:
        end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise ValueError(f"cannot read {path}: its header lacks tensors' data_offsets; {_REDOWNLOAD}") from None
    if 8 + length + end > size:
        raise ValueError(
            f"cannot read {path}: it is truncated (its header describes {8 + length + end} bytes, the file holds "
            f"{size}); {_REDOWNLOAD}"
        )
    return header


def tensor_files(folder: str | os.PathLike) -> dict[str, str]:
    """Each tensor of a model folder with the weights file that holds it, every file's header checked
    (`read_header`); an index naming a shard that is not there, or a tensor its shard lacks, is a ValueError
    naming both."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if not index.is_file():
        if not (folder / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{folder} holds no {WEIGHTS_NAME} nor {INDEX_NAME}; save the model again")
        return dict.fromkeys(read_header(folder / WEIGHTS_NAME), WEIGHTS_NAME)
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        weight_map = None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"cannot read {index}: not a JSON object with a weight_map; {_REDOWNLOAD}")
    missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
    if missing:
        raise FileNotFoundError(f"{index} names shards that are not there: {', '.join(missing[:3])}; {_REDOWNLOAD}")
    headers = {shard: read_header(folder / shard) for shard in sorted(set(weight_map.values()))}
    for name, shard in weight_map.items():
        if name not in headers[shard]:
            holder = next((s for s, h in headers.items() if name in h), None)
            where = f"it is in {holder}" if holder else "no shard holds it"
            raise ValueError(f"{index} maps {name} to {shard}, which lacks it ({where}); {_REDOWNLOAD}")
    return dict(weight_map)


class ShardedTensors(Mapping):
    """The tensors of a model folder (`model.safetensors`, or the shards `model.safetensors.index.json` names) as a
    read-only mapping from name to tensor: each lookup reads that tensor from its shard, nothing is kept.

    `meta(name)` gives its shape and dtype without reading it; `rows(name, start, stop)` reads part of its first axis.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._handles: dict[str, object] = {}
        self.shard_of: dict[str, str] = tensor_files(self.folder)
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}

    def _open(self, shard: str):
        if shard not in self._handles:
            self._handles[shard] = safe_open(self.folder / shard, framework="pt")
        return self._handles[shard]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.shard_of:
            raise KeyError(name)
        return self._open(self.shard_of[name]).get_tensor(name)

    def file_of(self, name: str) -> Path:
        """The file that holds `name`, or for a tensor it lacks the file that would (the index, or the one file)."""
        if name in self.shard_of:
            return self.folder / self.shard_of[name]
        return self.folder / (INDEX_NAME if (self.folder / INDEX_NAME).is_file() else WEIGHTS_NAME)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._open(self.shard_of[name]).get_slice(name)[start:stop]

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) from the shard's header."""
        if name not in self._meta:
            part = self._open(self.shard_of[name]).get_slice(name)
            self._meta[name] = (tuple(part.get_shape()), _DTYPES[part.get_dtype()])
        return self._meta[name]

    def shapes(self) -> dict[str, torch.Tensor]:
        """Every tensor as an empty `meta`-device tensor of its shape and dtype: what a spec validates against."""
        return {n: torch.empty(self.meta(n)[0], dtype=self.meta(n)[1], device="meta") for n in self}

    def nbytes(self, name: str) -> int:
        shape, dtype = self.meta(name)
        return math.prod(shape) * dtype.itemsize

    def __iter__(self) -> Iterator[str]:
        return iter(self.shard_of)

    def __len__(self) -> int:
        return len(self.shard_of)

    def __contains__(self, name) -> bool:
        return name in self.shard_of


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string as `save_pretrained` takes it ("500MB", "5GB", "2GiB")."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


class ShardWriter:
    """Writes a model's tensors into shards of at most `max_shard_size` bytes (a larger tensor gets its own), named
    and indexed as `save_pretrained` names them; the index is written last, by `close`.

    `layout`: name -> (shape, dtype), in the order the tensors go into the shards. Each shard's header is written
    when the writer opens, so a tensor goes straight to its place: memory holds one tensor, not a shard. Write
    into a staging folder (`io_utils.atomic_dir`): until `close`, the shards are incomplete.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
        max_shard_size: int | str = "5GB",
        metadata: Mapping[str, str] | None = None,
    ):
        self.folder = Path(folder)
        limit = parse_size(max_shard_size)
        shards: list[list[str]] = [[]]
        size = 0
        for name, (shape, dtype) in layout.items():
            nbytes = math.prod(shape) * dtype.itemsize
            if shards[-1] and size + nbytes > limit:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        count = len(shards)
        self.files = [
            WEIGHTS_NAME if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)
        ]
        self._layout = dict(layout)
        self._place: dict[str, tuple[int, int, int]] = {}  # name -> (shard, offset in file, bytes)
        self._fds: list[int] = []
        for i, names in enumerate(shards):
            header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
            offset = 0
            for name in names:
                shape, dtype = self._layout[name]
                nbytes = math.prod(shape) * dtype.itemsize
                header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            start = 8 + len(raw)
            fd = os.open(self.folder / self.files[i], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.pwrite(fd, struct.pack("<Q", len(raw)) + raw, 0)
            os.ftruncate(fd, start + offset)
            for name in names:
                begin, end = header[name]["data_offsets"]
                self._place[name] = (i, start + begin, end - begin)
        self._written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._place:
            raise KeyError(f"{name!r} is not in the layout this writer was opened with")
        shape, dtype = self._layout[name]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(
                f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, the layout says {tuple(shape)} {dtype}"
            )
        shard, offset, nbytes = self._place[name]
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        view = memoryview(data)
        while view.nbytes:
            done = os.pwrite(self._fds[shard], view, offset)
            view, offset = view[done:], offset + done
        self._written.add(name)

    def close(self) -> None:
        """Check that every tensor was written, then write the index (sharded output only)."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        missing = [n for n in self._layout if n not in self._written]
        if missing:
            raise RuntimeError(f"the shards lack {len(missing)} tensors, e.g. {missing[:3]}")
        if len(self.files) > 1:
            weight_map = {name: self.files[shard] for name, (shard, _, _) in self._place.items()}
            total = sum(nbytes for _, _, nbytes in self._place.values())
            params = sum(math.prod(shape) for shape, _ in self._layout.values())
            index = {"metadata": {"total_parameters": params, "total_size": total}, "weight_map": weight_map}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind, *exc) -> None:
        if kind is None:
            self.close()
        else:
            for fd in self._fds:
                os.close(fd)
            self._fds = []
