"""One source of truth for each data set we know: schema, normalisation, where it lives."""

from __future__ import annotations

from dataclasses import dataclass

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    hub_id: str
    class_names: tuple[str, ...]
    num_channels: int
    image_size: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    image_column: str = "image"
    label_column: str = "label"


DATASETS = {
    "fashion_mnist": DatasetInfo(
        "fashion_mnist",
        "zalando-datasets/fashion_mnist",
        ("T - shirt / top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        1,
        28,
        (0.2860,),
        (0.3530,),
    ),
    "mnist": DatasetInfo("mnist", "ylecun/mnist", tuple(str(i) for i in range(10)), 1, 28, (0.1307,), (0.3081,)),
    "cifar10": DatasetInfo(
        "cifar10",
        "uoft-cs/cifar10",
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        3,
        32,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        image_column="img",
    ),
}


NORMALISATIONS = ("dataset", "mnist")
"""dataset: each data set's own training-set statistics; mnist: MNIST's (0.1307, 0.3081) for any 1-channel
data set, as the authors' code normalises Fashion-MNIST (the midpoints it gives differ: benchmarks/results/crosscheck)."""


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


def normalisation_constants(name: str, normalisation: str = "dataset") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel that data set `name` is normalised with under `normalisation` (NORMALISATIONS)."""
    info = dataset_info(name)
    if normalisation == "dataset":
        return info.image_mean, info.image_std
    if normalisation != "mnist":
        raise ValueError(f"normalisation={normalisation!r} is not supported; choose one of {list(NORMALISATIONS)}")
    if info.num_channels != 1:
        raise ValueError(
            f"normalisation 'mnist' is for 1-channel images and {name} has {info.num_channels} "
            "channels; set data.normalisation=dataset"
        )
    mnist = DATASETS["mnist"]
    return mnist.image_mean, mnist.image_std
