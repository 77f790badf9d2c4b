"""The nets of a merge: each loaded once per checkpoint, on one device, all with net 0's permutation spec."""

from __future__ import annotations

import hashlib
import logging
import operator
from collections.abc import Callable

import torch
from transformers import AutoImageProcessor, AutoTokenizer

from ..alignment.base import input_shape, model_input
from ..alignment.tracing import attach_permutation_spec, example_inputs_for, example_tokens, trace
from ..data.tensors import load_tensors
from ..devices import check_device
from ..models.folders import load_config, load_model
from ..models.image_processing_perm import image_processor_for
from .sources import NetSource
from .tokenizers import compare_tokenizers

logger = logging.getLogger("hf_permerge.merging")

_IGNORED_CONFIG_KEYS = {
    "seed",
    "_name_or_path",
    "transformers_version",
    "architectures",
    "id2label",
    "label2id",
    "dtype",
    "torch_dtype",
    "initializer_range",
}
"""Config fields that say how a net was made or trained, not what its weights mean (dropout rates too)."""


def _architecture(cfg) -> dict:
    return {
        k: v
        for k, v in cfg.to_dict().items()
        if k not in _IGNORED_CONFIG_KEYS and "dropout" not in k and "drop_path" not in k and "layerdrop" not in k
    }


def check_same_architecture(configs: list, names: list[str]) -> None:
    """Refuse nets of different architectures, naming the model types, else the first differing config field."""
    ref = _architecture(configs[0])
    for cfg, name in zip(configs[1:], names[1:]):
        if cfg.model_type != configs[0].model_type:
            raise ValueError(
                f"cannot merge {names[0]} with {name}: different model types ({configs[0].model_type!r} "
                f"vs {cfg.model_type!r}); only nets of one architecture can be aligned and merged"
            )
        other = _architecture(cfg)
        for key in sorted(set(ref) | set(other)):
            if ref.get(key) != other.get(key):
                raise ValueError(
                    f"cannot merge {names[0]} with {name}: different architectures "
                    f"({key}: {ref.get(key)!r} vs {other.get(key)!r}); only nets of one architecture "
                    "can be aligned and merged"
                )


def net_fingerprint(model) -> str:
    """A short digest of a net's weights: every tensor's name, shape and a strided sample of its values."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].to(
            "cpu", torch.float64 if tensor.is_floating_point() else torch.int64
        )
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


class Nets:
    """N nets of one architecture at their checkpoints. `catalog_data` names the merge's data set ((name,
    data_dir)), whose test images trace a spec for a model whose config records no input size."""

    def __init__(
        self,
        sources: list[NetSource],
        device=None,
        example_inputs=None,
        image_processor=None,
        catalog_data: Callable[[], tuple] = lambda: ("fashion_mnist", None),
        allow_different_tokenizers: bool = False,
    ):
        if len(sources) < 2:
            raise ValueError("merging needs at least two nets")
        self.sources = sources
        passed = sorted({s.passed for s in sources})
        if len(passed) > 1:
            raise ValueError(
                f"the models passed are different checkpoints ({', '.join(passed)}) of their nets, and a "
                "merge takes one checkpoint of every net: pass the same checkpoint of each (or the net "
                "folders, and choose one with checkpoint=... / --checkpoint)"
            )
        self.default_checkpoint = passed[0]
        self.device = check_device(device) if device else torch.device("cpu")
        self._cache: dict = {}
        self.traced = None
        self.example_inputs = example_inputs
        self.image_processor = image_processor
        self._catalog_data = catalog_data
        configs = [self.config(i, next(iter(s.checkpoints))) for i, s in enumerate(sources)]
        check_same_architecture(configs, [s.name for s in sources])
        self.tokenizers_differ = compare_tokenizers(
            [s.checkpoints.get(self.default_checkpoint) or next(iter(s.checkpoints.values())) for s in sources],
            [s.label for s in sources],  # portable: the difference is recorded in merge_config.json
            allow_different_tokenizers,
        )
        """How the nets' tokenizers differ, when told to merge them anyway (said in the card); else None."""
        self.spec = None
        self.spec = self.load(0).permutation_spec()

    def __len__(self) -> int:
        return len(self.sources)

    def config(self, i: int, checkpoint: str):
        return load_config(self.sources[i].folder(checkpoint))

    def load(self, i: int, checkpoint: str | None = None):
        checkpoint = checkpoint or self.default_checkpoint
        key = (i, checkpoint)
        if key not in self._cache:
            model = load_model(self.sources[i].folder(checkpoint))
            self._cache[key] = self._with_spec(model.to(self.device).eval())
        return self._cache[key]

    def check_net(self, i, what: str = "i") -> int:
        try:
            index = operator.index(i) if not isinstance(i, bool) else None
        except TypeError:
            index = None
        if index is None or not 0 <= index < len(self):
            raise ValueError(f"{what} must name a net 0..{len(self) - 1} (an int), got {i!r}")
        return index

    def fingerprints(self, checkpoint: str | None = None) -> list[str]:
        return [net_fingerprint(self.load(i, checkpoint)) for i in range(len(self))]

    def _with_spec(self, model):
        """Our classes declare their spec; any other model (a transformers ViT, a ResNet) gets one traced
        from its graph once, on net 0 (`self.spec` still None), and shared by every net loaded after it;
        groups the tracer cannot follow are left unpermuted."""
        if hasattr(model, "permutation_spec"):
            return model
        if self.spec is not None:
            return attach_permutation_spec(model, self.spec)
        try:
            example = self.example_inputs if self.example_inputs is not None else self._example_pixels(model)
            traced = trace(model, example, on_unsupported="skip")
        except ValueError as err:
            raise ValueError(
                f"{type(model).__name__} declares no permutation spec and tracing one failed: {err}. "
                "If the model takes other inputs than the data set's images, pass "
                "PermMerger.from_pretrained(..., example_inputs=<pixel tensor>); or attach a spec "
                "yourself (hf_permerge.alignment.attach_permutation_spec)"
            ) from err
        for what, groups in (("leaves unpermuted", traced.skipped), ("keeps in place", traced.kept)):
            if groups:
                logger.info(
                    "traced spec of %s %s %d groups: %s",
                    type(model).__name__,
                    what,
                    len(groups),
                    "; ".join(f"{k}: {v}" for k, v in groups.items()),
                )
        self.traced = traced
        return attach_permutation_spec(model, traced.spec)

    def _example_pixels(self, model):
        """Inputs to trace a spec with (tracing needs shapes only): random pixels of the input shape the model's
        config records (`example_inputs_for`), else two images of the merge's data set, with the config's
        channel count when it gives one (a ResNet takes any size)."""
        shape = input_shape(model)
        if (shape is not None and None not in shape) or example_tokens(model) is not None:
            return example_inputs_for(model)
        name, data_dir = self._catalog_data()
        images = load_tensors(name, "test", self.device, data_dir).pixel_values[:2]
        if shape is not None and shape[0] != images.shape[1]:
            images = torch.randn(2, shape[0], *images.shape[2:], generator=torch.Generator().manual_seed(0))
        return model_input(model, images)

    def is_text(self, model) -> bool:
        """A model that takes tokens (its config has a vocabulary), not pixels."""
        return example_tokens(model) is not None

    def tokenizer(self):
        """The tokenizer saved beside net 0 (None when it has none): it converts text for alignment and is saved
        beside the merged model. Loaded once."""
        if not hasattr(self, "_tokenizer"):
            folder = self.sources[0].folder(self.default_checkpoint)
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
            except (OSError, ValueError, TypeError):
                self._tokenizer = None
        return self._tokenizer

    def preprocessor_of(self, model):
        """What is saved beside a merged model: net 0's tokenizer for a text model, else the image processor."""
        if self.is_text(model):
            tokenizer = self.tokenizer()
            if tokenizer is None:
                logger.warning(
                    "net 0 (%s) has no tokenizer saved beside it, so the merged folder gets none: save the "
                    "tokenizer beside the model (tokenizer.save_pretrained(folder)) to have it copied",
                    self.sources[0].name,
                )
            return tokenizer
        return self.image_processor_of(model)

    def image_processor_of(self, model):
        """Ours for our configs; for other models, the one passed to the merger, else the one saved beside
        net 0 (none if it has none)."""
        if hasattr(model.config, "image_mean"):
            return image_processor_for(model.config)
        if self.image_processor is None:
            try:
                first = next(iter(self.sources[0].checkpoints.values()))
                self.image_processor = AutoImageProcessor.from_pretrained(first, trust_remote_code=False)
            except (OSError, ValueError):
                logger.warning(
                    "net 0 (%s) has no image processor, so the merged folder gets none and "
                    "pipeline('image-classification') cannot load it; pass the model's image processor: "
                    "PermMerger.from_pretrained(..., image_processor="
                    "AutoImageProcessor.from_pretrained(<its base model>, trust_remote_code=False))",
                    self.sources[0].name,
                )
                return None
        return self.image_processor
