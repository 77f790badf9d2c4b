"""PermImageProcessor: ecosystem clients feed our models exactly what the data path feeds them."""

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoImageProcessor, pipeline

import hf_permerge  # noqa: F401  (registers the model and image processor classes)
from hf_permerge import PermCNNConfig, PermCNNForImageClassification, PermMLPConfig, PermMLPForImageClassification
from hf_permerge.data import DATASETS, normalise
from hf_permerge.data.loading import load_idx_arrays
from hf_permerge.models.image_processing_perm import PermImageProcessor, image_processor_for

FMNIST = DATASETS["fashion_mnist"]


@pytest.fixture(scope="module")
def fmnist_test_images():
    arrays = load_idx_arrays("fashion_mnist", "test")
    if arrays is None:
        pytest.skip("Fashion-MNIST IDX files not installed (`make data`)")
    return arrays[0][:32]


def small_mlp() -> PermMLPForImageClassification:
    config = PermMLPConfig(depth=1, width=16, id2label=dict(enumerate(FMNIST.class_names)))
    return PermMLPForImageClassification(config).eval()


def test_processor_reproduces_the_data_path_normalisation(fmnist_test_images):
    processor = image_processor_for(PermMLPConfig())
    pil_images = [PIL.Image.fromarray(x) for x in fmnist_test_images]
    got = processor(pil_images, return_tensors="pt")["pixel_values"]
    want = normalise(fmnist_test_images, FMNIST.image_mean, FMNIST.image_std)
    assert got.shape == (32, 1, 28, 28) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_rgb_and_numpy_inputs_become_the_models_grayscale(fmnist_test_images):
    processor = image_processor_for(PermMLPConfig())
    image = fmnist_test_images[0]
    want = processor(PIL.Image.fromarray(image), return_tensors="pt")["pixel_values"]
    variants = [
        PIL.Image.fromarray(image).convert("RGB"),  # what pipeline() hands over
        PIL.Image.fromarray(image).convert("RGBA"),
        image,  # (H, W) uint8
        np.repeat(image[:, :, None], 3, axis=2),
    ]  # (H, W, 3) uint8
    for variant in variants:
        torch.testing.assert_close(processor(variant, return_tensors="pt")["pixel_values"], want, atol=1e-6, rtol=0)


def test_three_channel_model_gets_rgb_at_its_size():
    config = PermCNNConfig(
        layers="8-avg-8", num_channels=3, image_size=32, image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.25, 0.3)
    )
    processor = image_processor_for(config)
    gray = PIL.Image.fromarray(np.full((28, 28), 128, dtype=np.uint8))
    out = processor(gray, return_tensors="pt")["pixel_values"]
    assert out.shape == (1, 3, 32, 32)
    want = (128 / 255 - torch.tensor([0.5, 0.4, 0.3])) / torch.tensor([0.2, 0.25, 0.3])
    torch.testing.assert_close(out[0, :, 16, 16], want, atol=1e-5, rtol=0)


def test_saved_processor_loads_back_through_the_auto_class(tmp_path):
    config = PermCNNConfig(
        layers="8", num_channels=3, image_size=32, image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.25, 0.3)
    )
    PermCNNForImageClassification(config).save_pretrained(tmp_path)
    image_processor_for(config).save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, PermImageProcessor)
    assert loaded.num_channels == 3 and (loaded.size.height, loaded.size.width) == (32, 32)
    assert list(loaded.image_mean) == [0.5, 0.4, 0.3] and list(loaded.image_std) == [0.2, 0.25, 0.3]


def test_pipeline_classifies_a_fashion_mnist_image_from_a_saved_folder(tmp_path, fmnist_test_images):
    model = small_mlp()
    model.save_pretrained(tmp_path)
    image_processor_for(model.config).save_pretrained(tmp_path)
    image = PIL.Image.fromarray(fmnist_test_images[0])

    predictions = pipeline("image-classification", model=str(tmp_path), device="cpu")(image, top_k=10)

    with torch.no_grad():
        probs = model(normalise(fmnist_test_images[:1], FMNIST.image_mean, FMNIST.image_std)).logits.softmax(-1)[0]
    assert [p["label"] for p in predictions] == [FMNIST.class_names[i] for i in probs.argsort(descending=True)]
    np.testing.assert_allclose([p["score"] for p in predictions], probs.sort(descending=True).values, atol=1e-5)
