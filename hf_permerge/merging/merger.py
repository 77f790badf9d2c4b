"""PermMerger: align N nets onto the first, then merge trained weights, inits or any saved step."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import numbers
import operator
import shutil
import time
from pathlib import Path

import torch

from ..alignment import Permutations, get_matcher
from ..alignment.spec import apply_permutations
from ..io_utils import PYTHON_WORDING, Wording, atomic_dir, check_output_dir, only_a_local_path, write_json_atomic
from ..records import AlignmentRecord, read_record
from .repair import DEFAULT_NUM_EXAMPLES as DEFAULT_REPAIR_EXAMPLES
from .repair import apply_repair, check_repair_mode, require_batchnorm
from .sources import NetSource, load_sources

logger = logging.getLogger("hf_permerge.merging")

MARKER = "merge_config.json"
"""The file that marks a folder as a merged model of ours: the only kind `save_pretrained` may replace."""
PERMUTATIONS_MARKER = "alignment.json"
"""The file that marks a folder as a set of permutations of ours (`save_permutations`, `hf-permerge align`)."""
SAVE_TARGETS = {
    "merged model": (MARKER, (MARKER, "README.md", "config.json", "*.safetensors", "model.safetensors.index.json",
                              "generation_config.json", "preprocessor_config.json", "permutations", "report.json",
                              "*.png")),
    "set of permutations": (PERMUTATIONS_MARKER, (PERMUTATIONS_MARKER, "net_*.safetensors")),
}
"""What each output of the merger is marked by, and consists of (a transformers model's own files included):
--overwrite replaces only a folder of that kind, and refuses one holding anything else."""

_IGNORED_CONFIG_KEYS = {"seed", "_name_or_path", "transformers_version", "architectures", "id2label", "label2id",
                        "dtype", "torch_dtype", "initializer_range"}
"""Config fields that say how a net was made or trained, not what its weights mean (dropout rates too)."""


def _architecture(cfg) -> dict:
    return {k: v for k, v in cfg.to_dict().items()
            if k not in _IGNORED_CONFIG_KEYS and "dropout" not in k and "drop_path" not in k and "layerdrop" not in k}


def check_same_architecture(configs: list, names: list[str]) -> None:
    """Refuse nets of different architectures, naming the model types, else the first differing config field."""
    ref = _architecture(configs[0])
    for cfg, name in zip(configs[1:], names[1:]):
        if cfg.model_type != configs[0].model_type:
            raise ValueError(f"cannot merge {names[0]} with {name}: different model types ({configs[0].model_type!r} "
                             f"vs {cfg.model_type!r}); only nets of one architecture can be aligned and merged")
        other = _architecture(cfg)
        for key in sorted(set(ref) | set(other)):
            if ref.get(key) != other.get(key):
                raise ValueError(f"cannot merge {names[0]} with {name}: different architectures "
                                 f"({key}: {ref.get(key)!r} vs {other.get(key)!r}); only nets of one architecture "
                                 "can be aligned and merged")


def net_fingerprint(model) -> str:
    """A short digest of a net's weights: every tensor's name, shape and a strided sample of its values."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // 4096)].to("cpu", torch.float64 if tensor.is_floating_point() else torch.int64)
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def check_save_target(output_dir, overwrite: bool = False, what: str = "merged model",
                      wording: Wording = PYTHON_WORDING) -> Path:
    """`io_utils.check_output_dir`'s rule for one of `SAVE_TARGETS` ("merged model", "set of permutations"), in a
    Python caller's words by default (`overwrite=True`; the CLI passes its own, `--overwrite`)."""
    marker, contents = SAVE_TARGETS[what]
    return check_output_dir(output_dir, overwrite, marker=marker, what=f"a {what}", wording=wording, contents=contents)


def average_state_dicts(states: list[dict], weights: list[float]) -> dict:
    """Weighted average of state dicts; integer buffers (BatchNorm's counter) are taken from the first."""
    out = {}
    for key, ref in states[0].items():
        if ref.is_floating_point():
            out[key] = sum(w * s[key].to(ref.dtype) for w, s in zip(weights, states))
        else:
            out[key] = ref.clone()
    return out


class PermMerger:
    """Load N nets, align them onto net 0, merge.

        merger = PermMerger.from_pretrained("runs/pair")      # or a Hub repo id, or [dir_a, dir_b, ...]
        merger.align()                                         # activation matching on 10k training images
        merged = merger.merge(alpha=0.5)                       # (1 - alpha) * theta_0 + alpha * pi(theta_1)
        init_avg = merger.merge(alpha=0.5, checkpoint="init")  # the same permutation on the untrained inits
        merger.save_pretrained("runs/merged")
    """

    def __init__(self, sources: list[NetSource], pair: dict | None = None, device=None, example_inputs=None,
                 image_processor=None):
        if len(sources) < 2:
            raise ValueError("merging needs at least two nets")
        self.sources = sources
        self.pair = pair
        passed = sorted({s.passed for s in sources})
        if len(passed) > 1:
            raise ValueError(f"the models passed are different checkpoints ({', '.join(passed)}) of their nets, and a "
                             "merge takes one checkpoint of every net: pass the same checkpoint of each (or the net "
                             "folders, and choose one with checkpoint=... / --checkpoint)")
        self.default_checkpoint = passed[0]
        """The checkpoint that merging, aligning and loading use unless told otherwise: `final`, or the one
        whose folders were passed (`[a/net_0/step-50, b/net_0/step-50]` merges step-50)."""
        self.device = torch.device(device) if device else torch.device("cpu")
        self.permutations: list[Permutations] | None = None
        self.alignment: dict = {}
        self._last_merge: dict | None = None
        self._last_model = None
        self._cache: dict = {}
        self.traced = None
        """The `TracedSpec` when net 0 declares no spec of its own (what was traced, what was skipped)."""
        self.example_inputs = example_inputs
        self.image_processor = image_processor
        """For models saved without an image processor: converts a `datasets.Dataset` for them and is saved
        beside the merged model (our models bring their own)."""
        self.data: dict | None = None
        """{"dataset", "data_dir"} to align and repair on by default, when not the pair's own (`use_data`)."""
        self._default_data_used = False
        configs = [self._config(i, next(iter(s.checkpoints))) for i, s in enumerate(sources)]
        check_same_architecture(configs, [s.name for s in sources])
        self.spec = None
        self.spec = self.load(0).permutation_spec()

    @classmethod
    def from_pretrained(cls, pair_or_models, device=None, example_inputs=None, *, token: str | None = None,
                        revision: str | None = None, image_processor=None) -> "PermMerger":
        """A pair folder, the Hub repo id of a pair, or a list of >= 2 model folders / repo ids.

        token, revision: for repo ids (a private repo; a branch, tag or commit); the token defaults to HF_TOKEN
        or `hf auth login`'s, and is never stored.
        example_inputs: for models without a `permutation_spec()` (any HF image classifier), the inputs to
        trace one with (a pixel tensor); default two test images of the pair's data set (Fashion-MNIST).
        image_processor: for models saved without one (e.g. `AutoImageProcessor.from_pretrained(<base model>)`):
        it converts your `datasets.Dataset` for them and is saved beside the merged model, so that
        `pipeline("image-classification")` loads it. Net 0's own is used when this is None.
        """
        sources, pair = load_sources(pair_or_models, token=token, revision=revision)
        return cls(sources, pair, device, example_inputs, image_processor)

    # -- loading ---------------------------------------------------------------------------------
    @property
    def num_nets(self) -> int:
        return len(self.sources)

    def _config(self, i: int, checkpoint: str):
        from transformers import AutoConfig

        import hf_permerge  # noqa: F401  (registers our model types)
        return AutoConfig.from_pretrained(self.sources[i].folder(checkpoint))

    def load(self, i: int, checkpoint: str | None = None):
        """Net i at a checkpoint (default: `default_checkpoint`), as saved (not permuted), on the merger's
        device, in eval mode."""
        import hf_permerge  # noqa: F401

        from ..models.folders import load_model
        checkpoint = checkpoint or self.default_checkpoint
        key = (i, checkpoint)
        if key not in self._cache:
            model = load_model(self.sources[i].folder(checkpoint))
            self._cache[key] = self._with_spec(model.to(self.device).eval())
        return self._cache[key]

    def _with_spec(self, model):
        """Our classes declare their spec; any other model (a transformers ViT, a ResNet) gets one traced
        from its graph once, on net 0 (`self.spec` still None), and shared by every net loaded after it;
        groups the tracer cannot follow are left unpermuted."""
        if hasattr(model, "permutation_spec"):
            return model
        from ..alignment.tracing import attach_permutation_spec, trace

        if self.spec is None:
            try:
                example = self.example_inputs if self.example_inputs is not None else self._example_pixels(model)
                traced = trace(model, example, on_unsupported="skip")
            except ValueError as err:
                raise ValueError(f"{type(model).__name__} declares no permutation spec and tracing one failed: {err}. "
                                 "If the model takes other inputs than the data set's images, pass "
                                 "PermMerger.from_pretrained(..., example_inputs=<pixel tensor>); or attach a spec "
                                 "yourself (hf_permerge.alignment.attach_permutation_spec)") from err
            if traced.skipped:
                logger.info("traced spec of %s leaves %d groups unpermuted: %s", type(model).__name__,
                            len(traced.skipped), "; ".join(f"{k}: {v}" for k, v in traced.skipped.items()))
            self.traced = traced
            return attach_permutation_spec(model, traced.spec)
        return attach_permutation_spec(model, self.spec)

    def _example_pixels(self, model):
        """Inputs to trace a spec with (tracing needs shapes only): random pixels of the input shape the model's
        config records (`example_inputs_for`), else two images of the merge's data set, with the config's
        channel count when it gives one (a ResNet takes any size)."""
        from ..alignment.matchers import input_shape, model_input
        from ..alignment.tracing import example_inputs_for
        from ..data.tensors import load_tensors

        shape = input_shape(model)
        if shape is not None and None not in shape:
            return example_inputs_for(model)
        images = load_tensors(self.dataset_name(), "test", self.device, self.data_dir()).pixel_values[:2]
        if shape is not None and shape[0] != images.shape[1]:
            images = torch.randn(2, shape[0], *images.shape[2:], generator=torch.Generator().manual_seed(0))
        return model_input(model, images)

    def use_data(self, dataset, data_dir=None, name: str | None = None) -> None:
        """Align and repair on this data unless given data (by default: the pair's data set, and Fashion-MNIST for
        models without a pair.json). `dataset` is a catalog name (e.g. from a config), read from `data_dir` if
        given, or a `datasets.Dataset` (an `image` column; `name`, its Hub id if it has one, is what the model card
        and merge_config.json call it; a local path never is)."""
        if isinstance(dataset, str):
            from ..data.catalog import dataset_info

            dataset_info(dataset)                         # an unknown name is an error now, not at align
            self.data = {"dataset": dataset, "data_dir": data_dir}
            return
        from ..data.tensors import check_image_dataset

        if not hasattr(dataset, "column_names"):
            raise TypeError(f"use_data takes a catalog name (e.g. 'fashion_mnist') or a datasets.Dataset, got "
                            f"{type(dataset).__name__}")
        if data_dir is not None:
            raise ValueError("data_dir names the files of a catalog data set; a datasets.Dataset brings its own "
                             "images: drop data_dir")
        if name is not None and (not isinstance(name, str) or only_a_local_path(name) or len(Path(name).parts) != 2
                                 or Path(name).exists()):
            raise ValueError(f"name={name!r} is not a Hub dataset id (owner/name); it is written into the model card and "
                             "merge_config.json, so a local path is never taken: pass the Hub id, or no name")
        check_image_dataset(dataset)
        self.data = {"dataset": name, "data_dir": None, "given": dataset}

    def _given_default(self):
        """The `datasets.Dataset` of `use_data`, or None when the default data is a catalog data set."""
        return (self.data or {}).get("given")

    def dataset_name(self) -> str | None:
        if self.data is not None:
            return self.data["dataset"]
        return (self.pair or {}).get("config", {}).get("data", {}).get("dataset", "fashion_mnist")

    def data_dir(self):
        if self.data is not None:
            return self.data["data_dir"]
        return (self.pair or {}).get("config", {}).get("data", {}).get("data_dir")

    # -- aligning --------------------------------------------------------------------------------
    def align(self, dataset=None, matcher: str = "activation", checkpoint: str | None = None,
              reference: str = "net_0", max_rounds: int = 50, **settings) -> list[Permutations]:
        """Align every net onto net 0 at `checkpoint`; returns one `Permutations` per net (net 0: identity).

        `dataset` is a `datasets.Dataset` (Hub schema) or a `TensorSplit`; by default the pair's
        training split (the matcher takes its fixed subset of `num_examples`). The weight matcher uses no data.
        reference: "net_0" (the paper's: each net matched to net 0), or "average": starting from that, each net
        is matched to the average of the others, for rounds until none changes (at most `max_rounds`; Git
        Re-Basin's MergeMany), which lines the nets up with each other for `merge_all`. Net 0 stays as it is.
        """
        from ..alignment.average import REFERENCES, align_activations_jointly, align_to_average

        if reference not in REFERENCES:
            raise ValueError(f"reference={reference!r} is not supported; choose one of {list(REFERENCES)}")
        if reference == "average" and max_rounds < 1:
            raise ValueError(f"max_rounds={max_rounds} must be >= 1")
        if reference == "average" and matcher not in ("activation", "weight"):
            raise ValueError(f"reference='average' is implemented for the activation and weight matchers, not "
                             f"{matcher!r}; use reference='net_0'")
        if reference == "average" and matcher == "activation" and self.spec.couplings:
            raise ValueError("reference='average' with activations does not handle attention heads (coupled groups) "
                             "yet; use reference='net_0', or the weight matcher")
        checkpoint = checkpoint or self.default_checkpoint
        m = get_matcher(matcher, **settings)
        given = dataset is not None and matcher != "weight"     # the weight matcher reads no data
        if matcher == "weight":
            dataset = None
        elif given:
            dataset = self.tensor_split(dataset, getattr(m, "num_examples", None), getattr(m, "seed", 0))
        else:
            dataset = self._default_data("align", getattr(m, "num_examples", None), getattr(m, "seed", 0))
        ref = self.load(0, checkpoint)
        start = time.perf_counter()
        perms = [Permutations.identity(self.spec)]
        others = [self.load(i, checkpoint) for i in range(1, self.num_nets)]
        rounds = {}
        if reference == "average" and matcher == "activation":   # it finds the star alignment on its way
            perms, rounds = align_activations_jointly([ref, *others], m, dataset, None, max_rounds)
        elif hasattr(m, "match_many"):   # one net's Hungarian solves overlap the next net's statistics
            perms += m.match_many(ref, others, dataset)
        else:
            perms += [m.match(ref, other, dataset) for other in others]
        if reference == "average" and matcher == "weight":
            perms, rounds = align_to_average([ref, *others], m, dataset, perms, max_rounds)
        if reference == "average":
            rounds = {"reference": reference, "max_rounds": max_rounds, **rounds}
        self.set_permutations(perms, matcher=matcher, settings=dict(m.settings),   # the defaults filled in
                              checkpoint=checkpoint, align_s=time.perf_counter() - start, **rounds,
                              **({"examples": min(len(dataset), getattr(m, "num_examples", None) or len(dataset))}
                                 if dataset is not None else {}),      # the images used: fewer if fewer were given
                              **({"data": "given by the caller"} if given else
                                 {"data": self._default_data_label()} if matcher != "weight" and self.data else {}))
        return perms

    def tensor_split(self, data, num_examples: int | None = None, seed: int = 0):
        """Data for aligning or repairing as a `TensorSplit`: a `datasets.Dataset` goes through our
        normalisation (our models) or, for any other model, the image processor saved beside net 0.
        Only the `num_examples` images the matcher or REPAIR will use are converted: the same seeded
        subset, in the same order, that `TensorSplit.subset(num_examples, seed)` takes."""
        from ..alignment.matchers import as_tensor_split
        from ..data.tensors import TensorSplit, subset_indices

        model = self.load(0)
        if isinstance(data, TensorSplit):
            return as_tensor_split(data, model)
        if hasattr(data, "select") and num_examples is not None and num_examples < len(data):
            data = data.select(subset_indices(len(data), num_examples, seed).tolist())
        return as_tensor_split(data, model, processor=self._image_processor(model))

    def described_dataset(self) -> str | None:
        """The data set a card and merge_config.json name: the pair's (its nets were trained on it, whatever they
        were aligned on), else the default data the merge used, and none when the caller gave the data
        unnamed (we cannot name it)."""
        if self.pair is not None:
            return self.pair.get("config", {}).get("data", {}).get("dataset", "fashion_mnist")
        caller = self.alignment.get("data") == "given by the caller" or \
            (self._last_merge or {}).get("repair_data") == "given by the caller"
        return self.dataset_name() if self._default_data_used and not caller else None

    def _default_data_label(self) -> str | None:
        """What alignment.json / merge_config.json say the default data was when `use_data` chose it (None: the
        pair's training split, as before `use_data` existed)."""
        if self.data is None:
            return None
        given = self._given_default()
        if given is not None:
            split = getattr(given, "split", None)        # e.g. load_dataset(id, split="test") remembers "test"
            if self.dataset_name() is None:
                return "a data set without a Hub id (a local folder, or an unnamed datasets.Dataset)"
            return f"{self.dataset_name()} {split} split" if split else self.dataset_name()
        return f"{self.dataset_name()} training split"

    def set_permutations(self, perms: list[Permutations], **alignment) -> None:
        """Use permutations found elsewhere (e.g. at another step: the paper's perm@x)."""
        if len(perms) != self.num_nets:
            raise ValueError(f"need {self.num_nets} permutations (one per net, net 0's the identity), got {len(perms)}")
        for p in perms:
            p.validate(self.spec)
        self.permutations = list(perms)
        self.alignment = dict(alignment)
        self._last_merge = self._last_model = None    # a merge made with other permutations is not saved as this one

    def _require_alignment(self) -> list[Permutations]:
        if self.permutations is None:
            raise RuntimeError("no permutations yet: call merger.align() first (or set_permutations)")
        return self.permutations

    # -- merging ---------------------------------------------------------------------------------
    def _check_net(self, i, what: str = "i") -> int:
        try:
            index = operator.index(i) if not isinstance(i, bool) else None
        except TypeError:
            index = None
        if index is None or not 0 <= index < self.num_nets:
            raise ValueError(f"{what} must name a net 0..{self.num_nets - 1} (an int), got {i!r}")
        return index

    def permuted_state(self, i: int, checkpoint: str | None = None, permute: bool = True) -> dict:
        self._check_net(i)
        state = self.load(i, checkpoint).state_dict()
        if not permute or i == 0:
            return state
        return apply_permutations(self.spec, state, self._require_alignment()[i])

    def permuted(self, i: int, checkpoint: str | None = None):
        """Net i permuted onto net 0: the same function as net i, its units lined up with net 0's."""
        self._check_net(i)
        return self._require_alignment()[i].apply(self.load(i, checkpoint), self.spec)

    def check_repair(self, repair: str | None) -> None:
        """Refuse a repair mode that cannot apply to these nets, before any alignment or averaging is spent."""
        check_repair_mode(repair)
        if repair == "reset_bn":
            require_batchnorm(self.load(0))

    def _model_with(self, state: dict, checkpoint: str):
        import copy

        model = copy.deepcopy(self.load(0, checkpoint))
        model.load_state_dict(state)
        return model

    def merge(self, alpha: float = 0.5, checkpoint: str | None = None, other: int = 1, permute: bool = True,
              repair: str | None = None, repair_data=None, repair_examples: int | None = DEFAULT_REPAIR_EXAMPLES):
        """`(1 - alpha) * theta_0 + alpha * pi(theta_other)` as a new model; `permute=False` gives vanilla averaging.

        repair: None, "repair" (REPAIR: each unit's pre-activation mean/std set to the interpolation of the
        endpoints') or "reset_bn" (BatchNorm running statistics recomputed), on `repair_examples` images of
        `repair_data` (default: the pair's training split); see `hf_permerge.merging.repair`. A repaired
        merge is recorded as `merge_settings()["merge"]["repair"]` (absent: no repair).
        """
        checkpoint = checkpoint or self.default_checkpoint
        if isinstance(alpha, torch.Tensor) and alpha.numel() == 1:
            alpha = alpha.item()
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
        if self._check_net(other, "other") == 0:
            raise ValueError(f"other must name a net 1..{self.num_nets - 1} (net 0 is the reference), got 0")
        return self._merge([0, other], [1 - float(alpha), float(alpha)], checkpoint, permute, repair, repair_data,
                           repair_examples, alpha=float(alpha))

    def merge_all(self, checkpoint: str | None = None, k: int | None = None, permute: bool = True,
                  repair: str | None = None, repair_data=None, repair_examples: int | None = DEFAULT_REPAIR_EXAMPLES):
        """Uniform average of the first k aligned nets (all by default): the paper's Fig. 3 mid. `repair` as in `merge`."""
        checkpoint = checkpoint or self.default_checkpoint
        k = self.num_nets if k is None else k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_nets:
            raise ValueError(f"k must be in 1..{self.num_nets}, got {k}")
        return self._merge(list(range(k)), [1.0 / k] * k, checkpoint, permute, repair, repair_data, repair_examples,
                           alpha=None)

    def _merge(self, nets: list[int], weights: list[float], checkpoint: str, permute: bool, repair, repair_data,
               repair_examples, alpha: float | None):
        """The weighted average of `nets` (net 0 as it is, the others permuted onto it unless not `permute`),
        repaired if asked; remembered as the merge `save_pretrained` saves."""
        self.check_repair(repair)
        states = [self.permuted_state(i, checkpoint, permute) for i in nets]
        merged = self._model_with(average_state_dicts(states, weights), checkpoint)
        scale_only = []
        if repair is not None:
            endpoints = [self._endpoint(i, checkpoint, permute) for i in nets] if repair == "repair" else []
            scale_only = apply_repair(repair, merged, endpoints, self._repair_data(repair_data, repair_examples),
                                      weights, num_examples=repair_examples, **self._repair_sites(repair))
        self._remember(merged, {"alpha": alpha, "checkpoint": checkpoint, "nets": nets, "permuted": permute,
                                **({"repair_scale_only": scale_only} if scale_only else {})},
                       repair, repair_data, repair_examples)
        return merged

    def _remember(self, merged, settings: dict, repair, repair_data, repair_examples) -> None:
        """The last merge's settings (merge_config.json) and the model itself, which `save_pretrained` saves by
        default: redoing it could not reproduce a repair on data the caller passed."""
        if repair:
            settings.update(repair=repair, repair_examples=repair_examples,
                            repair_data=(self._default_data_label() or "the pair's training split") if repair_data is None
                            else "given by the caller")
        self._last_merge = settings
        self._last_model = merged

    def _endpoint(self, i: int, checkpoint: str, permute: bool):
        """Net i as it enters the merge: permuted onto net 0 (or as saved, for vanilla averaging)."""
        return self.permuted(i, checkpoint) if permute and i > 0 else self.load(i, checkpoint)

    def _repair_sites(self, repair: str) -> dict:
        """A traced spec knows every branch's last affine layer (residual streams included): REPAIR them all."""
        if repair == "repair" and self.traced is not None and self.traced.repair_modules:
            return {"modules": list(self.traced.repair_modules)}
        return {}

    def _repair_data(self, data, examples: int | None = None):
        return self.tensor_split(data, examples) if data is not None else self._default_data("repair", examples)

    def _default_data(self, purpose: str, num_examples: int | None = None, seed: int = 0):
        """The pair's training split (Fashion-MNIST for models without a pair.json), or the data of `use_data`, if
        it fits the models; `purpose` ("align" or "repair") picks the way out named. A `datasets.Dataset` is
        converted as far as `num_examples` (seeded subset) goes, as `tensor_split` does."""
        from ..alignment.matchers import fits, input_shape_text
        from ..data.tensors import load_tensors

        if self._given_default() is not None:
            data = self.tensor_split(self._given_default(), num_examples, seed)
        else:
            data = load_tensors(self.dataset_name(), "train", self.device, self.data_dir())
        if not fits(data.pixel_values, self.load(0)):
            fix = ("pass the data they were trained on (merger.align(dataset)); on the command line, name it with "
                   "--dataset / --data-dir, or use --matcher weight, which needs no data" if purpose == "align" else
                   "pass the data they were trained on (merge(..., repair_data=dataset)); on the command line, name "
                   "it with --dataset / --data-dir, or drop --repair")
            raise ValueError(f"the default data, {self.dataset_name() or 'the data set given'} training images of "
                             f"shape {tuple(data.pixel_values.shape[1:])}, do not fit these models, which take "
                             f"{input_shape_text(self.load(0))}: {fix}")
        self._default_data_used = True
        return data

    # -- saving ----------------------------------------------------------------------------------
    def _permuted_merge(self) -> bool:
        """Whether the merge being saved used the permutations (a vanilla average uses none)."""
        return (self._last_merge or {}).get("permuted", True)

    def merge_settings(self) -> dict:
        """merge_config.json: what was merged and how. Sources by their portable labels (never local absolute
        paths: the file is pushed with the model); no alignment for a vanilla average, which used none."""
        return {
            "format": "hf_permerge.merge/1",
            "sources": [s.label for s in self.sources],
            "hub_sources": [s.hub_id for s in self.sources if s.hub_id],
            **({"hub_commits": {s.hub_id: s.commit for s in self.sources if s.commit}}
               if any(s.commit for s in self.sources) else {}),
            "merge": self._last_merge,
            "alignment": dict(self.alignment) if self._permuted_merge() else None,
            **({"fingerprints": self.fingerprints(self.alignment.get("checkpoint"))}
               if self.permutations is not None and self._permuted_merge() else {}),
            "dataset": self.described_dataset(),
            **({"traced_spec": {"groups": self.spec.names, "skipped": dict(self.traced.skipped),
                                "head_couplings": [list(c) for c in self.spec.couplings]}}
               if self.traced is not None else {}),
        }

    def model_card(self, model, report: dict | None = None, plots=(), command: str | None = None, repo_id=None):
        """The merged model's card (`huggingface_hub.ModelCard`): sources, matcher, merge, measured numbers."""
        from ..reporting.model_card import render_model_card  # cards are reporting's job; imported only here

        last = self._last_merge or {}
        nets = last.get("nets", [0, 1])
        permuted = self._permuted_merge()
        matcher = ({"name": self.alignment["matcher"], **(self.alignment.get("settings") or {}),
                    **({"reference": "average"} if self.alignment.get("reference") == "average" else {})}
                   if permuted and self.alignment.get("matcher") else None)     # unknown for bare permutation files
        return render_model_card({
            "base_models": [{"name": self.sources[i].label, "hub": bool(self.sources[i].hub_id),
                             "repo": self.sources[i].hub_id} for i in nets],
            "nets": nets,
            "config": model.config.to_dict(),
            "dataset": self.described_dataset(),
            "dataset_trained": self.pair is not None,     # bare folders: the data they were merged with, not trained on
            "permuted": permuted,
            "matcher": matcher,
            "align_checkpoint": self.alignment.get("checkpoint") if permuted else None,
            "checkpoint": last.get("checkpoint", self.default_checkpoint),
            "alpha": last.get("alpha", 0.5),
            "uniform": last.get("alpha", 0.5) is None,
            "repair": last.get("repair"),
            "repair_scale_only": last.get("repair_scale_only"),
            "traced_spec": ({"groups": len(self.spec.groups), "skipped": sorted(self.traced.skipped)}
                            if self.traced is not None and permuted else None),
            "report": report,
            "plots": list(plots),
            "command": command,
            "repo_id": repo_id,
        })

    def _last_merged_model(self):
        """The model the last `merge`/`merge_all` returned (alpha 0.5 on the default checkpoint if none yet)."""
        return self._last_model if self._last_model is not None else self.merge(0.5)

    def save_pretrained(self, output_dir, model=None, report: dict | None = None, files=(),
                        command: str | None = None, overwrite: bool = False) -> Path:
        """Write the merged model (HF folder), image processor, permutations, merge settings and model card.

        `model` defaults to the model the last merge returned (alpha 0.5 if none). It is described
        as the last `merge`/`merge_all` made it. The permutations are saved only when the merge used them.
        `report` (report.json) and `files` (e.g. plots) are stored beside it and described in the card.
        The folder appears whole or not at all; an existing folder is refused (see `check_save_target`).
        """
        from ..models.folders import write_model_files

        output_dir = check_save_target(output_dir, overwrite)
        if model is None:
            model = self._last_merged_model()
        perms = self._require_alignment() if self._permuted_merge() else None
        with atomic_dir(output_dir) as tmp:
            write_model_files(model, tmp)
            processor = self._image_processor(model)
            if processor is not None:
                processor.save_pretrained(tmp)
            if perms is not None:
                (tmp / "permutations").mkdir()
                for i, p in enumerate(perms):
                    p.save(tmp / "permutations" / f"net_{i}.safetensors")
            write_json_atomic(tmp / MARKER, self.merge_settings())
            names = []
            for f in map(Path, files):
                shutil.copy2(f, tmp / f.name)
                names.append(f.name)
            if report is not None:
                write_json_atomic(tmp / "report.json", report)
            plots = [n for n in names if n.endswith(".png")]
            self.model_card(model, report, plots, command).save(tmp / "README.md")
        return output_dir

    def _image_processor(self, model):
        """Ours for our configs; for other models, the one passed to the merger, else the one saved beside
        net 0 (none if it has none)."""
        from ..models.image_processing_perm import image_processor_for

        if hasattr(model.config, "image_mean"):
            return image_processor_for(model.config)
        if self.image_processor is None:
            from transformers import AutoImageProcessor

            try:
                self.image_processor = AutoImageProcessor.from_pretrained(
                    next(iter(self.sources[0].checkpoints.values())))
            except (OSError, ValueError):
                logger.warning("net 0 (%s) has no image processor, so the merged folder gets none and "
                               "pipeline('image-classification') cannot load it; pass the model's image processor: "
                               "PermMerger.from_pretrained(..., image_processor=AutoImageProcessor.from_pretrained("
                               "<its base model>))", self.sources[0].name)
                return None
        return self.image_processor

    def save_permutations(self, output_dir) -> Path:
        """Write net_i.safetensors + alignment.json; an earlier alignment folder is replaced, a user's never."""
        output_dir = check_save_target(output_dir, overwrite=True, what="set of permutations",
                                       wording=dataclasses.replace(PYTHON_WORDING, overwrite="save_permutations, which "
                                                                   "replaces only an earlier set of permutations"))
        with atomic_dir(output_dir) as tmp:
            for i, p in enumerate(self._require_alignment()):
                p.save(tmp / f"net_{i}.safetensors")
            write_json_atomic(tmp / PERMUTATIONS_MARKER, {
                **self.merge_settings(), "merge": None, "alignment": dict(self.alignment),
                "fingerprints": self.fingerprints(self.alignment.get("checkpoint"))})  # also after a vanilla merge
        return output_dir

    def fingerprints(self, checkpoint: str | None = None) -> list[str]:
        """Each net's `net_fingerprint` at a checkpoint: saved beside permutations, so that they are never
        applied to other nets."""
        return [net_fingerprint(self.load(i, checkpoint)) for i in range(self.num_nets)]

    def load_permutations(self, folder, check_nets: bool = True) -> list[Permutations]:
        """Permutations saved by `save_permutations` / `hf-permerge align` (or a merged model's permutations/).

        They must have been found for these nets: the same number of nets, and (`check_nets`, where the
        folder records them) the same weights, by `fingerprints`. Permutations of other nets would merge
        silently wrong."""
        folder = Path(folder)
        found = len(list(folder.glob("net_*.safetensors")))
        if found and found != self.num_nets:
            raise ValueError(f"{folder} holds permutations of {found} nets, and this merge has {self.num_nets}: they "
                             "were found for other nets. Align these nets instead (merger.align(), or hf-permerge "
                             "merge without --permutations)")
        record = next((read_record(f, AlignmentRecord, "pass the folder written by `hf-permerge align`")
                       for f in (folder / PERMUTATIONS_MARKER, folder.parent / MARKER) if f.is_file()), {})
        saved = record.get("fingerprints")
        if check_nets and saved:
            ours = self.fingerprints((record.get("alignment") or {}).get("checkpoint"))
            if list(saved) != ours:
                differ = [f"net {i}" for i, (a, b) in enumerate(zip(saved, ours)) if a != b]
                raise ValueError(f"{folder} holds permutations found for other nets (other weights in {', '.join(differ)}"
                                 "). Align these nets instead (merger.align(), or hf-permerge merge without "
                                 "--permutations)")
        perms = []
        for i in range(self.num_nets):
            path = folder / f"net_{i}.safetensors"
            if not path.is_file():
                raise FileNotFoundError(f"{folder} lacks net_{i}.safetensors; pass the folder written by "
                                        "`hf-permerge align` (or a merge's permutations/ folder)")
            perms.append(Permutations.load(path))
        self.set_permutations(perms, **(record.get("alignment") or {}))
        return perms

    def push_to_hub(self, repo_id: str, output_dir=None, **kwargs):
        """Save (if not yet saved) and upload the merged folder in one commit; see `hf_permerge.hub`."""
        import tempfile

        from ..hub import check_repo_id, push_folder_to_hub

        check_repo_id(repo_id)
        if output_dir is not None:
            return push_folder_to_hub(output_dir, repo_id, **kwargs)
        with tempfile.TemporaryDirectory(prefix="hf_permerge_push_") as tmp:
            self.save_pretrained(Path(tmp) / "merged")
            return push_folder_to_hub(Path(tmp) / "merged", repo_id, **kwargs)
