"""Reader for the IDX files that Fashion-MNIST and MNIST ship as (optionally gzipped)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read a whole IDX file into one array (no per-sample loop)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number); re-install the data set")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_DTYPES[data[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - offset != expected:
        raise ValueError(f"{path} is truncated or corrupt: expected {expected} data bytes, found {len(data) - offset}")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(dims)


def find_idx_pair(data_dir: str | Path, split: str) -> tuple[Path, Path]:
    """Images and labels of a split in a directory of IDX files (the Debian/LeCun names, gzipped or not)."""
    prefix = {"train": "train", "test": "t10k"}[split]
    data_dir = Path(data_dir)
    found = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        for name in (f"{prefix}-{kind}.gz", f"{prefix}-{kind}"):
            if (data_dir / name).is_file():
                found.append(data_dir / name)
                break
        else:
            raise FileNotFoundError(
                f"no {prefix}-{kind}[.gz] in {data_dir}. Install the real Fashion-MNIST with "
                "`apt-get install dataset-fashion-mnist` (it lands in /usr/share/datasets/fashion-mnist), "
                "or pass data_dir= (config key data.data_dir) pointing at a folder with the IDX files."
            )
    return found[0], found[1]
