"""Image processor for our models: what `pipeline("image-classification")` needs to feed them.

It reproduces the data path's normalisation (`hf_permerge.data.tensors.normalise`: uint8 / 255, then
(x - mean) / std per channel) from the fields every model config carries (`num_channels`, `image_size`,
`image_mean`, `image_std`), so a saved or pushed model classifies a PIL image with no code of ours
beyond `import hf_permerge`. The pipeline converts every image to RGB first; we convert back to the
model's channel count (grayscale "L" for one channel, the same luminance formula as PIL's).
"""

from __future__ import annotations

import logging

import numpy as np
import PIL.Image
from transformers import AutoImageProcessor
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import PILImageResampling
from transformers.processing_utils import ImagesKwargs

from .configuration_perm_cnn import PermCNNConfig
from .configuration_perm_mlp import PermMLPConfig

logger = logging.getLogger(__name__)

# ITU-R 601-2 luma, as PIL's convert("L")
_LUMA = np.array([0.299, 0.587, 0.114])


class PermImageProcessorKwargs(ImagesKwargs, total=False):
    num_channels: int


def _to_channels(image: np.ndarray, num_channels: int) -> np.ndarray:
    """A channels-first image with `num_channels` channels (grayscale <-> RGB, alpha dropped)."""
    channels = image.shape[0]
    if channels == num_channels:
        return image
    if channels == 4:  # RGBA: drop alpha
        return _to_channels(image[:3], num_channels)
    if num_channels == 1 and channels == 3:
        luma = np.tensordot(_LUMA, image.astype(np.float64), axes=1)[None]
        return np.clip(np.rint(luma), 0, 255).astype(np.uint8) if image.dtype == np.uint8 else luma.astype(image.dtype)
    if num_channels == 3 and channels == 1:
        return np.repeat(image, 3, axis=0)
    raise ValueError(f"cannot convert an image with {channels} channels to the model's {num_channels}")


class PermImageProcessor(PilBackend):
    """PIL / NumPy images -> `pixel_values` (N, C, H, W) float32: to C channels, resize, /255, normalise.

    Defaults are Fashion-MNIST's; `image_processor_for(config)` builds one from a model config.
    """

    valid_kwargs = PermImageProcessorKwargs
    model_input_names = ["pixel_values"]
    num_channels = 1
    size = {"height": 28, "width": 28}
    resample = PILImageResampling.BILINEAR
    do_resize = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_convert_rgb = False
    image_mean = [0.2860]
    image_std = [0.3530]

    def _prepare_images_structure(self, images, expected_ndims: int = 3):
        # A grayscale array (H, W), as our data sets hold them, is one image: give it its channel axis.
        def with_channel(x):
            return x[None] if getattr(x, "ndim", None) == 2 else x

        images = [with_channel(x) for x in images] if isinstance(images, (list, tuple)) else with_channel(images)
        return super()._prepare_images_structure(images, expected_ndims=expected_ndims)

    def process_image(self, image, *args, num_channels: int | None = None, **kwargs) -> np.ndarray:
        num_channels = num_channels or self.num_channels
        if isinstance(image, PIL.Image.Image):  # PIL's own conversion is exact
            image = image.convert("L" if num_channels == 1 else "RGB")
        kwargs["do_convert_rgb"] = False
        return _to_channels(super().process_image(image, *args, **kwargs), num_channels)

    def resize(self, image: np.ndarray, size, resample=None, **kwargs) -> np.ndarray:
        if image.shape[-2:] == (size.height, size.width):  # already the model's size: no resampling round trip
            return image
        return super().resize(image, size, resample=resample, **kwargs)


def image_processor_for(config) -> PermImageProcessor:
    """The image processor that feeds a model with this config the inputs it was trained on."""
    return PermImageProcessor(
        num_channels=int(config.num_channels),
        size={"height": int(config.image_size), "width": int(config.image_size)},
        image_mean=[float(m) for m in config.image_mean],
        image_std=[float(s) for s in config.image_std],
    )


def register_image_processor() -> None:
    """Make `AutoImageProcessor` (and so `pipeline`) pick PermImageProcessor for our model configs."""
    for config_class in (PermMLPConfig, PermCNNConfig):
        try:
            AutoImageProcessor.register(
                config_class, image_processor_classes={"pil": PermImageProcessor}, exist_ok=True
            )
        except ImportError as err:  # transformers < 5.24 wants torchvision for AutoImageProcessor
            logger.debug("AutoImageProcessor not registered for %s: %s", config_class.__name__, err)
            return
