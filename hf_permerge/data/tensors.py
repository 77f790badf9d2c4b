"""The hot path: a whole split as normalised tensors on the device, made once."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from .catalog import dataset_info
from .loading import check_image_dataset, load_idx_arrays, load_image_dataset


def subset_indices(size: int, n: int, seed: int) -> torch.Tensor:
    """The indices of a fixed random subset of n of `size` examples: `TensorSplit.subset`'s, and the images
    `PermMerger.tensor_split` converts from a `datasets.Dataset`, so both take the same examples in the same order."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:n]


@dataclass
class TensorSplit:
    """A split on the device: `pixel_values` (N, C, H, W) float32 normalised, `labels` (N,) int64."""

    pixel_values: torch.Tensor
    labels: torch.Tensor
    fingerprint: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int | None, seed: int = 0) -> TensorSplit:
        """A fixed random subset of n examples (all when n is None or >= len)."""
        if n is None or n >= len(self):
            return self
        idx = subset_indices(len(self), n, seed).to(self.labels.device)
        return TensorSplit(self.pixel_values[idx], self.labels[idx], f"{self.fingerprint}:subset{n}@{seed}")

    def batches(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N, B, C, H, W) and labels (N, B) of N nets' batches, idx (N, B), in one gather
        (index_select: 10x faster than a batch per net stacked, for 12 nets on the CPU)."""
        flat = idx.flatten()
        return (
            self.pixel_values.index_select(0, flat).view(*idx.shape, *self.pixel_values.shape[1:]),
            self.labels.index_select(0, flat).view(idx.shape),
        )

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split as (inputs, labels), as the model's forward takes them."""
        return self.pixel_values, self.labels

    def to(self, device) -> TensorSplit:
        return TensorSplit(self.pixel_values.to(device), self.labels.to(device), self.fingerprint)


def normalise(images: np.ndarray | torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 images (N, H, W) or (N, H, W, C) -> float (N, C, H, W), (x/255 - mean) / std per channel."""
    x = torch.tensor(np.asarray(images))
    if x.ndim == 3:
        x = x.unsqueeze(-1)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


NO_LABEL = -1
"""The label of an example from a dataset without a 'label' column (activation matching and REPAIR need none)."""


def dataset_to_arrays(ds) -> tuple[np.ndarray, np.ndarray]:
    """A `datasets.Dataset` with the Hub schema -> (uint8 images, int64 labels; NO_LABEL without a 'label'
    column). Images of different sizes are refused with the fix named."""
    check_image_dataset(ds)
    arr = ds.with_format("numpy")
    try:
        images = np.asarray(arr["image"], dtype=np.uint8)
    except ValueError:
        raise ValueError(
            "the dataset's images differ in size or in channels; bring them to the model's input size "
            "and mode first (e.g. ds.map with PIL's Image.resize / Image.convert)"
        ) from None
    labels = (
        np.asarray(arr["label"], dtype=np.int64)
        if "label" in ds.column_names
        else np.full(len(images), NO_LABEL, dtype=np.int64)
    )
    return images, labels


def processed_split(ds, processor, batch_size: int = 256) -> TensorSplit:
    """A `datasets.Dataset` through a model's image processor (resize, RGB, its normalisation), for models
    whose config records no normalisation of ours (a transformers ViT, ResNet, ...)."""
    check_image_dataset(ds)
    pixels = [
        processor(images=ds[start : start + batch_size]["image"], return_tensors="pt")["pixel_values"]
        for start in range(0, len(ds), batch_size)
    ]
    pixel_values = torch.cat(pixels).float()
    labels = (
        torch.as_tensor(ds["label"], dtype=torch.int64)
        if "label" in ds.column_names
        else torch.full((len(pixel_values),), NO_LABEL, dtype=torch.int64)
    )
    return TensorSplit(pixel_values, labels, fingerprint_arrays(pixel_values.numpy(), labels.numpy()))


def fingerprint_arrays(images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()[:16]


_CACHE: dict = {}


def load_tensors(
    name: str = "fashion_mnist", split: str = "train", device="cpu", data_dir=None, mean_std: tuple | None = None
) -> TensorSplit:
    """Normalised tensors of a split on `device`; local IDX files are read without `datasets` at all.
    mean_std: the (mean, std) per channel to normalise with (`normalisation_constants`); None: the catalog's."""
    info = dataset_info(name)
    mean, std = (info.image_mean, info.image_std) if mean_std is None else (tuple(mean_std[0]), tuple(mean_std[1]))
    key = (name, split, str(data_dir), mean, std)
    if key not in _CACHE:
        arrays = load_idx_arrays(name, split, data_dir)
        if arrays is None:
            arrays = dataset_to_arrays(load_image_dataset(name, split, data_dir))
        images, labels = arrays
        _CACHE[key] = TensorSplit(
            normalise(images, mean, std), torch.from_numpy(labels), fingerprint_arrays(images, labels)
        )
    return _CACHE[key].to(device)


def recorded_normalisation(model, name: str) -> tuple | None:
    """(image_mean, image_std) a model's config records (ours: what it was trained with), when it has one value
    per channel of data set `name`; None otherwise (the catalog's then)."""
    cfg = getattr(model, "config", None)
    mean, std = getattr(cfg, "image_mean", None), getattr(cfg, "image_std", None)
    if mean is None or std is None or len(mean) != dataset_info(name).num_channels or len(std) != len(mean):
        return None
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def tensors_from_dataset(ds, name: str = "fashion_mnist", device="cpu") -> TensorSplit:
    """Any `datasets.Dataset` with the Hub schema -> normalised tensors (the user-data path)."""
    info = dataset_info(name)
    images, labels = dataset_to_arrays(ds)
    return TensorSplit(
        normalise(images, info.image_mean, info.image_std), torch.from_numpy(labels), fingerprint_arrays(images, labels)
    ).to(device)
