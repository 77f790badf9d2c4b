"""Data: the Hub schema, the fast tensor path equals the datasets path, clear errors."""

import datasets
import numpy as np
import pytest
import torch

from hf_permerge.data import dataset_info, load_image_dataset, load_tensors, tensors_from_dataset
from hf_permerge.data.idx import read_idx


def test_dataset_has_hub_schema(tiny_fmnist):
    ds = load_image_dataset("fashion_mnist", "test", data_dir=tiny_fmnist)
    assert len(ds) == 500 and ds.column_names == ["image", "label"]
    assert isinstance(ds.features["label"], datasets.ClassLabel)
    assert ds.features["label"].names == list(dataset_info("fashion_mnist").class_names)
    assert isinstance(ds.features["image"], datasets.Image) and ds[0]["image"].size == (28, 28)


def test_fast_tensor_path_equals_datasets_path(tiny_fmnist):
    fast = load_tensors("fashion_mnist", "test", data_dir=tiny_fmnist)
    slow = tensors_from_dataset(load_image_dataset("fashion_mnist", "test", data_dir=tiny_fmnist))
    assert torch.equal(fast.pixel_values, slow.pixel_values) and torch.equal(fast.labels, slow.labels)
    assert fast.fingerprint == slow.fingerprint
    assert fast.pixel_values.shape == (500, 1, 28, 28)


def test_real_fashion_mnist_is_the_default(real_fmnist):
    test = load_tensors("fashion_mnist", "test")
    assert len(test) == 10000 and test.labels.bincount().tolist() == [1000] * 10
    # normalised with the statistics recorded in the catalog (and in every model config)
    assert abs(test.pixel_values.mean().item()) < 0.02 and abs(test.pixel_values.std().item() - 1) < 0.02


def test_hub_path_with_local_data_of_the_same_schema(monkeypatch, tiny_fmnist):
    """MNIST/CIFAR-10 go through datasets.load_dataset; here it returns local data of the Hub's schema."""
    images = read_idx(tiny_fmnist / "t10k-images-idx3-ubyte.gz")[:20]
    rgb = np.repeat(images[..., None], 3, axis=-1)
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=list(dataset_info("cifar10").class_names))}
    )
    fake = datasets.Dataset.from_dict({"img": list(rgb), "label": [0] * 20}, features=features)
    calls = []

    def fake_load(path, split=None, **kw):
        calls.append((path, split))
        return fake

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    ds = load_image_dataset("cifar10", "test")
    assert calls == [("uoft-cs/cifar10", "test")] and ds.column_names == ["image", "label"]
    t = tensors_from_dataset(ds, "cifar10")
    assert t.pixel_values.shape == (20, 3, 28, 28)


def test_offline_hub_error_says_how_to_get_data(monkeypatch):
    def fail(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(RuntimeError, match="unreachable|data_dir"):
        load_image_dataset("mnist", "train")


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tensors("fashion_mnist", "train", data_dir=tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_tensors("fashion_mnist", "train", data_dir=tmp_path)


def test_corrupt_idx_file_is_refused(tmp_path):
    (tmp_path / "x.idx").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x10abc")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx(tmp_path / "x.idx")


def test_batches_gathers_each_nets_batch(tiny_fmnist):
    """The trainer's one-gather batches equal indexing the split once per net."""
    split = load_tensors("fashion_mnist", "train", "cpu", tiny_fmnist)
    idx = torch.stack([torch.randperm(len(split), generator=torch.Generator().manual_seed(s))[:7] for s in range(3)])
    images, labels = split.batches(idx)
    assert images.shape == (3, 7, *split.pixel_values.shape[1:]) and labels.shape == (3, 7)
    for i in range(3):
        assert torch.equal(images[i], split.pixel_values[idx[i]]) and torch.equal(labels[i], split.labels[idx[i]])
