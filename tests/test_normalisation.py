"""data.normalisation: the data set's own statistics (default) or MNIST's, as the authors' code."""

import pytest
import torch

from hf_permerge.config import ConfigError
from hf_permerge.data import load_tensors
from hf_permerge.data.catalog import normalisation_constants
from hf_permerge.merging import PermMerger
from hf_permerge.models.image_processing_perm import image_processor_for
from hf_permerge.reporting.pipeline import evaluation_splits
from hf_permerge.training import PairTrainer, build_model

MNIST = ((0.1307,), (0.3081,))


def test_constants_and_refusal_for_colour_images(tiny_config):
    assert normalisation_constants("fashion_mnist") == ((0.2860,), (0.3530,))
    assert normalisation_constants("fashion_mnist", "mnist") == MNIST
    with pytest.raises(ValueError, match="data.normalisation=dataset"):
        normalisation_constants("cifar10", "mnist")
    with pytest.raises(ConfigError, match="normalisation"):
        tiny_config(data={"dataset": "cifar10", "normalisation": "mnist"})


def test_default_is_unchanged(tiny_config, tiny_fmnist):
    cfg = tiny_config()
    assert cfg.data.normalisation == "dataset"
    assert build_model(cfg, 0).config.image_mean == [0.2860]
    assert (
        load_tensors("fashion_mnist", "train", "cpu", tiny_fmnist, cfg.data.mean_std()).pixel_values
        is load_tensors("fashion_mnist", "train", "cpu", tiny_fmnist).pixel_values
    )  # one cached copy


def test_pair_trained_aligned_and_evaluated_on_mnist_normalised_inputs(tmp_path, tiny_config, tiny_fmnist):
    cfg = tiny_config(data={"normalisation": "mnist"}, training={"epochs": 1, "save_steps": []})
    PairTrainer(cfg, tmp_path / "pair", progress=False).train()
    merger = PermMerger.from_pretrained(tmp_path / "pair")
    net = merger.load(0)
    assert (net.config.image_mean, net.config.image_std) == ([0.1307], [0.3081])
    assert list(image_processor_for(net.config).image_mean) == [0.1307]  # a client of the net feeds it the same
    mnist = load_tensors("fashion_mnist", "train", "cpu", tiny_fmnist, MNIST)
    default = load_tensors("fashion_mnist", "train", "cpu", tiny_fmnist)
    assert torch.allclose(mnist.pixel_values * 0.3081 + 0.1307, default.pixel_values * 0.3530 + 0.2860, atol=1e-6)
    # matching and evaluation use the inputs the nets were trained on
    assert torch.equal(merger._data.default(merger._nets, "align").pixel_values, mnist.pixel_values)
    splits = evaluation_splits(cfg, "cpu", merger.recorded_normalisation())
    assert torch.equal(
        splits["test"].pixel_values, load_tensors("fashion_mnist", "test", "cpu", tiny_fmnist, MNIST).pixel_values
    )
