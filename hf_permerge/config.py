"""The run config: YAML sections `model`, `data`, `training`, `alignment`, `evaluation`, validated on load.

A typo or a wrong type fails early with an error naming the key (mergekit's lesson).
"""

from __future__ import annotations

import difflib
import logging
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from .matching import MATCHER_NAMES, MATCHER_SETTINGS, all_settings_fields

logger = logging.getLogger(__name__)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` as a string; every ML config writes learning rates that way."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$|^[-+]?\d[\d_]*\.\d*$|^[-+]?\.\d+$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        allow_inf_nan=False,  # finite or refused
        use_attribute_docstrings=True,
    )  # a field's docstring is its help


class ModelSection(_Section):
    type: Literal["mlp", "cnn", "transformers"] = "mlp"
    """mlp, cnn: the paper's image classifiers; transformers: a model of any transformers architecture, named by
    `model_type` and configured by `config`: a causal language model on a text data set, an image classifier
    (resnet, vit, convnext, ...) on an image data set."""
    depth: int = Field(2, ge=1)
    width: int = Field(512, ge=1)
    layers: str = "64-64-avg-128-128"
    batch_norm: bool = False
    bias: bool | None = None
    """None: the architecture's default, False for both as in the authors' code (older versions gave
    CNNs biases; saved models record theirs)."""
    init: Literal["kaiming_normal", "xavier", "orthogonal"] = "kaiming_normal"
    loss: Literal["cross_entropy", "mse"] = "cross_entropy"
    model_type: str | None = None
    """type transformers: the architecture, as `AutoConfig.for_model` names it (a language model: llama, gpt2,
    qwen2, ...; an image classifier: resnet, vit, convnext, ...)."""
    config: dict[str, Any] = Field(default_factory=dict)
    """type transformers: the fields of its config (hidden_size, num_hidden_layers, ...), each settable with
    `--set model.config.<key>=...`. Language models: vocab_size and the special tokens come from the tokenizer,
    max_position_embeddings defaults to data.block_size. Image classifiers: num_channels, image_size,
    num_labels, id2label and label2id come from the data set."""
    width_multiplier: float = Field(1.0, gt=0)
    """type transformers, image classifiers: scales every layer's width (resnet: embedding_size and
    hidden_sizes; vit: hidden_size and intermediate_size; convnext: hidden_sizes), rounded to whole units."""

    @field_validator("model_type")
    @classmethod
    def _check_model_type(cls, model_type: str | None):
        if model_type is not None:
            from .models.image_classifier import check_model_type

            check_model_type(model_type)
        return model_type

    @field_validator("config")
    @classmethod
    def _check_config(cls, config: dict, info):
        """A language model's config is checked here; an image classifier's with its data (`RunConfig`)."""
        from .models.image_classifier import is_image_classifier

        model_type = info.data.get("model_type")
        if model_type is not None and not is_image_classifier(model_type):
            from .models.causal_lm import causal_lm_config

            causal_lm_config(model_type, config)
        return config

    @model_validator(mode="after")
    def _check_layers(self):
        if self.type == "transformers":
            return self._check_transformers()
        if self.model_type is not None or self.config:
            raise ValueError(
                f"model.model_type and model.config are for type transformers, not {self.type}; "
                "drop them or set model.type: transformers"
            )
        if self.width_multiplier != 1:
            raise ValueError(
                f"model.width_multiplier is for type transformers, not {self.type}; set the "
                + ("widths in model.layers" if self.type == "cnn" else "width in model.width")
            )
        unused = ["depth", "width"] if self.type == "cnn" else ["layers"]
        changed = [k for k in unused if getattr(self, k) != type(self).model_fields[k].default]
        if changed:  # a warning, not an error: saved pairs list every field of their model section
            logger.warning(
                "model.%s %s no effect on %s (%s); ignored",
                " and model.".join(changed),
                "have" if len(changed) > 1 else "has",
                "a CNN" if self.type == "cnn" else "an MLP",
                "its layers are model.layers, e.g. 64-64-avg-128-128"
                if self.type == "cnn"
                else "its layers are model.depth x model.width",
            )
        if self.type == "cnn":
            from .models.configuration_perm_cnn import parse_layers

            try:
                parse_layers(self.layers)
            except ValueError as err:
                raise ValueError(f"model.layers: {err}") from None
        return self

    def _check_transformers(self):
        if self.model_type is None:
            raise ValueError(
                "model.model_type: type transformers needs an architecture, e.g. model_type: llama (or gpt2, qwen2; "
                "an image classifier: resnet, vit, convnext)"
            )
        if self.loss != "cross_entropy":
            raise ValueError(f"model.loss {self.loss}: a transformers model trains with cross entropy; drop model.loss")
        ours = ["depth", "width", "layers", "batch_norm", "bias", "init"]
        changed = [k for k in ours if getattr(self, k) != type(self).model_fields[k].default]
        if changed:
            logger.warning(
                "model.%s %s no effect on a transformers model (its architecture is model.config); ignored",
                " and model.".join(changed),
                "have" if len(changed) > 1 else "has",
            )
        return self


class DataSection(_Section):
    dataset: Literal["fashion_mnist", "mnist", "cifar10", "kjv"] = "fashion_mnist"
    """An image data set, or kjv: the King James text (Debian package bible-kjv) for language models, split by
    book (`heldout_every`)."""
    data_dir: str | None = None
    normalisation: Literal["dataset", "mnist"] = "dataset"
    """Input normalisation: dataset, the data set's own statistics (Fashion-MNIST: 0.2860, 0.3530); mnist,
    MNIST's (0.1307, 0.3081), as the authors' code normalises Fashion-MNIST. Models record theirs."""
    vocab_size: int = Field(2048, ge=257)
    """Text: tokens of the byte-level BPE tokenizer trained on the training books (256 bytes + end-of-text at
    least); the model's vocabulary."""
    block_size: int = Field(128, ge=2)
    """Text: tokens per training example; the text is packed into blocks of this length."""
    heldout_every: int = Field(10, ge=2)
    """Text: book b (1-based, canonical order) is held out when b is a multiple of this; 10 holds out 2 Samuel,
    Proverbs, Amos, Matthew, Philippians and 1 Peter (about a tenth of the verses)."""

    @property
    def is_text(self) -> bool:
        from .data.text import TEXT_DATASETS

        return self.dataset in TEXT_DATASETS

    @model_validator(mode="after")
    def _check_normalisation(self):
        text = ["vocab_size", "block_size", "heldout_every"]
        unused = ["data_dir", "normalisation"] if self.is_text else text
        changed = [k for k in unused if getattr(self, k) != type(self).model_fields[k].default]
        if changed:
            logger.warning(
                "data.%s %s no effect on %s; ignored",
                " and data.".join(changed),
                "have" if len(changed) > 1 else "has",
                "text" if self.is_text else "images",
            )
        if not self.is_text:
            from .data.catalog import normalisation_constants

            normalisation_constants(self.dataset, self.normalisation)
        return self

    def mean_std(self) -> tuple:
        """(mean, std) per channel the inputs are normalised with."""
        from .data.catalog import normalisation_constants

        return normalisation_constants(self.dataset, self.normalisation)


class FlatStop(_Section):
    """`training.stop_when_flat`: stop each net once its held-out curve has flattened (`hf_permerge.training.flat_stop`)."""

    patience: int = Field(3, ge=1)
    """Evaluations: a net stops when the best of its last `patience` held-out losses is not more than `min_delta`
    below the best before them."""
    min_delta: float = Field(0.01, ge=0)
    """Nats of held-out loss per token (test loss, for images) that count as an improvement."""


class TrainingSection(_Section):
    num_nets: int = Field(2, ge=1)
    seed: int = 0
    epochs: int = Field(5, ge=0)
    batch_size: int = Field(100, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1.0e-3, gt=0)
    weight_decay: float = Field(1.0e-2, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    save_steps: list[int] = Field(default_factory=list)
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many steps (smoke runs and tests); None: train all `epochs`."""
    engine: Literal["auto", "stacked", "per_net"] = "auto"
    """auto: all nets in one stacked engine on one process, except conv nets on the CPU and BatchNorm nets (one
    module per net); per-net under several processes."""
    precision: Literal["fp32", "tf32", "bf16"] = "fp32"
    """Training arithmetic. fp32 (the science default); tf32: fp32 weights, CUDA matmuls on tensor cores
    (about 2x for wide MLPs on an H200; the CPU computes fp32); bf16: autocast of the forward to bfloat16."""
    cuda_graphs: bool = True
    """Stacked engine on CUDA: capture the training step once as a CUDA graph and replay it (small
    nets are bound by kernel launches: an H200 trained a 2x2048 pair 2.2x faster, 12 such nets as fast
    as without; BENCHMARKS.md); ignored on the CPU and by the per-net engine."""
    log_with: str | None = None
    eval_each_epoch: bool = True
    eval_steps: int | None = Field(None, ge=1)
    """Also evaluate on the test (held-out) split every this many steps, logged and kept in each net's
    log_history (a language model's held-out loss curve); None: at epoch ends only."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """constant: `lr` throughout; cosine: from `lr` down to 0 over the run (after the warm-up)."""
    warmup_steps: int = Field(0, ge=0)
    """Steps over which the learning rate rises linearly from 0 to `lr` (0: none)."""
    stop_when_flat: FlatStop | None = None
    """Stop each net when its held-out loss has flattened ({patience: P, min_delta: D}, read at every evaluation;
    `hf_permerge.training.flat_stop`), `epochs` / `max_steps` the upper bound; its stop step and why are in its log_history.json
    and pair.json (`stop`). None: train every net to the end. Meant with lr_schedule constant (a cosine schedule
    flattens the curve by itself)."""

    @field_validator("epochs")
    @classmethod
    def _check_epochs(cls, epochs: int) -> int:
        if epochs < 1:
            raise ValueError(
                f"{epochs} epochs would train nothing; set 1 or more (and training.max_steps for a shorter run)"
            )
        return epochs

    @model_validator(mode="after")
    def _check_steps(self):
        bad = [s for s in self.save_steps if s <= 0]
        if bad:
            raise ValueError(
                f"training.save_steps must be positive step counts (step 0, the init, is always saved); got {bad}"
            )
        if self.stop_when_flat is not None and not self.eval_steps and not self.eval_each_epoch:
            raise ValueError(
                "training.stop_when_flat reads the held-out curve, but nothing evaluates it (eval_steps is null and "
                "eval_each_epoch false); set training.eval_steps"
            )
        return self


class _AlignmentBase(_Section):
    """What every matcher shares; each matcher's own settings are added from its model (`hf_permerge.matching`)."""

    matcher: Literal[MATCHER_NAMES] = "activation"
    checkpoint: str = Field("final", pattern=r"^(final|init|step-[1-9][0-9]*)$")
    """Checkpoint whose activations/weights define the permutation (final, init, step-N)."""
    reference: Literal["net_0", "average"] = "net_0"
    """What the nets are aligned onto: net 0 (the paper's), or each other (the matcher's objective summed over
    all pairs of nets; Git Re-Basin's MergeMany for weights): for averaging N > 2 nets (activation, weight)."""
    max_rounds: int = Field(50, ge=1)
    """reference average: rounds of coordinate ascent over the nets at most."""
    heads: Literal["move", "keep"] = "move"
    """Attention heads (blocked groups coupled across an attention layer): "move" lets whole heads move, as the
    spec allows; "keep" matches units within each head only, every head staying where it is (the ablation of
    Verma & Elbayad's question: does moving heads matter?)."""
    subset: Literal["fixed", "per_seed"] = "fixed"
    """The images a data matcher (activation, gradient) uses: one seeded subset for every run ("fixed"), or one
    drawn with the run's `training.seed` ("per_seed"), so that a sweep's seeds also sample the matching images."""

    @model_validator(mode="after")
    def _check_matcher_settings(self):
        """The chosen matcher's settings, checked together by its own model (e.g. weight's max_iter 0 needs
        bottom_up)."""
        settings = MATCHER_SETTINGS[self.matcher]
        try:
            settings.model_validate({k: getattr(self, k) for k in settings.model_fields})
        except ValidationError as err:
            msg = err.errors()[0]["msg"].removeprefix("Value error, ")
            raise ValueError(f"alignment (matcher {self.matcher}): {msg}") from None
        if self.reference == "average" and self.matcher == "gradient":
            raise ValueError(
                "alignment.reference: average is implemented for the activation and weight matchers, "
                "not gradient; set alignment.reference: net_0"
            )
        return self


AlignmentSection = create_model(
    "AlignmentSection",
    __base__=_AlignmentBase,
    __doc__="The `alignment` section: the shared fields and every "
    "matcher's settings (each declared once, by its matcher's model in `hf_permerge.matching`).",
    **{name: (info.annotation, info) for name, info in all_settings_fields().items()},
)


class EvaluationSection(_Section):
    num_lambdas: int = Field(11, ge=2)
    splits: list[Literal["test", "train"]] = Field(default_factory=lambda: ["test", "train"], min_length=1)
    train_subset: int = Field(10000, ge=1)
    n_way: bool = True
    plane: bool = False
    plane_resolution: int = Field(21, ge=3)
    schedules: list[int] = Field(default_factory=list)
    """perm@x steps for the schedule curves (Fig. 3 right); empty: no schedule curves."""
    current_perm: bool = False
    plots: bool = True
    batch_size: int = Field(10000, ge=1)
    repair: list[Literal["repair", "reset_bn"]] = Field(default_factory=list)
    """Also evaluate the midpoints after REPAIR and/or a BatchNorm reset (report.json `repair`, keyed by mode): a
    mode, a list of them (`[repair, reset_bn]`: the two corrections side by side), or none."""
    precision: Literal["fp32", "tf32"] = "fp32"
    """Arithmetic of the curves' forward passes. fp32 (the science default); tf32: CUDA matmuls on tensor
    cores, for sweeps that must be fast (measuring a 3x4096 stack was a third of its time on an H200; the
    CPU computes fp32 either way). Alignment statistics stay fp32 (see `alignment.products`)."""

    @field_validator("repair", mode="before")
    @classmethod
    def _one_repair_mode(cls, value):
        """A single mode (`repair: reset_bn`) is a list of one; null is none."""
        if value is None:
            return []
        return [value] if isinstance(value, str) else value


def image_fields(data: DataSection) -> dict[str, Any]:
    """What an image data set decides of a transformers image classifier's config (`image_classifier_config`)."""
    from .data.catalog import dataset_info

    info = dataset_info(data.dataset)
    mean, std = data.mean_std()
    return dict(
        num_channels=info.num_channels,
        image_size=info.image_size,
        class_names=tuple(info.class_names),
        image_mean=tuple(mean),
        image_std=tuple(std),
    )


class RunConfig(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    alignment: AlignmentSection = Field(default_factory=AlignmentSection)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)

    @model_validator(mode="after")
    def _check_schedules(self):
        """perm@x reads the nets at step x: the init (0), a saved step, or the last one (max_steps). Checked here,
        so that `run` refuses before training rather than skipping the curve after it."""
        t = self.training
        missing = [x for x in self.evaluation.schedules if x != 0 and x not in t.save_steps and x != t.max_steps]
        if missing:
            one = len(missing) == 1
            raise ValueError(
                f"evaluation.schedules asks for perm@{', perm@'.join(map(str, missing))}, but the nets are "
                f"not saved at {'that step' if one else 'those steps'} (training.save_steps: "
                f"{t.save_steps}); add {'it' if one else 'them'} to training.save_steps, or "
                f"drop {'it' if one else 'them'} from evaluation.schedules"
            )
        return self

    @model_validator(mode="after")
    def _check_data_fits_model(self):
        """A language model trains on text, an image classifier on images; checked before any data is read."""
        from .models.image_classifier import is_image_classifier

        m, d = self.model, self.data
        transformers = m.type == "transformers"
        lm = transformers and not is_image_classifier(m.model_type)
        if d.is_text != lm:
            what = f"model.type {m.type}" + (f" with model_type {m.model_type}" if transformers else "")
            raise ValueError(
                f"data.dataset {d.dataset} is {'text' if d.is_text else 'images'}, but {what} "
                + (
                    "is an image classifier; set model.type: transformers with a language model's model_type "
                    "(configs/kjv_llama_tiny.yaml)"
                    if d.is_text
                    else "is a language model; set data.dataset: kjv, or an image classifier's model_type "
                    "(resnet, vit, convnext: configs/fmnist_resnet_tiny.yaml), or model.type mlp or cnn"
                )
            )
        if transformers and self.training.engine == "stacked":
            raise ValueError(
                "training.engine: stacked is for the MLP and CNN; a transformers model trains one module per "
                "net (set training.engine: auto or per_net)"
            )
        if lm:
            from .models.causal_lm import causal_lm_config

            if m.width_multiplier != 1:
                raise ValueError(
                    "model.width_multiplier scales an image classifier's widths; for a language model set "
                    "model.config.hidden_size (and intermediate_size)"
                )
            causal_lm_config(m.model_type, m.config, d.vocab_size, 0, d.block_size)
        elif transformers:
            from .models.image_classifier import image_classifier_config

            image_classifier_config(m.model_type, m.config, m.width_multiplier, **image_fields(d))
        return self

    @model_validator(mode="after")
    def _check_alignment_checkpoint(self):
        """Aligning at step N needs the nets saved at step N: refused before training, not after it."""
        t, name = self.training, self.alignment.checkpoint
        if name.startswith("step-") and int(name[5:]) not in t.save_steps:
            raise ValueError(
                f"alignment.checkpoint {name} is not saved (training.save_steps: {t.save_steps}); add "
                f"{name[5:]} to training.save_steps, or align at final or init"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _known_keys(loc: tuple) -> list[str]:
    """The keys allowed where an unknown key `loc` was found: the section names, or the section's fields."""
    model = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _format_errors(err: ValidationError, source: str, overridden: dict[str, str] | None = None) -> str:
    """One line per problem, naming the key, what was wrong, and (for a value from `--set`) that override."""
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        item = next((v for k, v in (overridden or {}).items() if k == key or k.startswith(f"{key}.")), None)
        origin = f" [from --set {item}]" if item else ""
        if e["type"] == "extra_forbidden":
            known = _known_keys(e["loc"])
            close = difflib.get_close_matches(str(e["loc"][-1]), known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            if len(e["loc"]) == 1 and not close:  # a field without its section, or a sweep file
                owners = [f"{name}.{e['loc'][0]}" for name in known if e["loc"][0] in _known_keys((name, ""))]
                hint = (
                    f"did you mean {owners[0]!r}? "
                    if owners
                    else "a sweep config runs with `hf-permerge sweep FILE -o OUT`; "
                    if e["loc"][0] == "sweep"
                    else ""
                )
            where = "the sections are" if len(e["loc"]) == 1 else "its section's keys are"
            lines.append(
                f"  {key}: unknown key{origin} ({hint}{where} {', '.join(known)})"
                if known
                else f"  {key}: unknown key{origin} (check the spelling; see configs/ for the known keys)"
            )
        elif not e["loc"]:  # a check across sections: its message names the keys; no input dump
            given = [v for k, v in (overridden or {}).items() if k in e["msg"]]
            origin = f" [from --set {', '.join(given)}]" if given else ""
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}{origin}")
        elif e["msg"].removeprefix("Value error, ").startswith((f"{key}.", f"{key} ", f"{key}:")):
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}{origin}")  # names its key: no input dump
        else:
            got = e.get("input")
            lines.append(f"  {key}: {e['msg']} (got {got!r}){origin}")
    return "\n".join(lines)


def set_override(data: dict, keys: list[str], raw: str, item: str) -> None:
    """data[k0][k1]...[kn] = the YAML value of `raw`; `item` names the override in errors."""
    if not all(k.strip() for k in keys):
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. training.epochs=1")
    try:
        value = parse_yaml(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: cannot parse value: {err}") from None
    node = data
    for depth, k in enumerate(keys[:-1]):
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            where = ".".join(keys[: depth + 1])
            raise ConfigError(
                f"override {item!r}: {where!r} is not a section (it holds {child!r}, from the config "
                f"file or an earlier --set); set a key inside it, e.g. {where}.<key>=..."
            )
        node = child
    node[keys[-1]] = value


def override_keys(overrides: list[str] | None) -> dict[str, str]:
    """{'section.key': the override that set it} for error messages."""
    return {item.split("=", 1)[0].strip(): item for item in overrides or [] if "=" in item}


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply `section.key=value` overrides; values are parsed as YAML (so `1`, `1e-3`, `[1,2]` work)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. training.epochs=1")
        path, raw = item.split("=", 1)
        set_override(data, path.strip().split("."), raw, item)
    return data


def read_yaml_file(path: str | Path, what: str, shipped: str) -> dict:
    """A YAML mapping from a file, or a ConfigError saying what is wrong and where the shipped ones are."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist; the shipped ones are in {shipped}")
    try:
        data = parse_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {path} is not valid YAML: {err}") from None
    if data is None:
        raise ConfigError(
            f"{what} {path} is empty; start from one of {shipped} (an empty mapping `{{}}` means every default)"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{what} {path} must be a mapping with sections model, data, training, ... "
            f"(it holds a {type(data).__name__}); see {shipped}"
        )
    return data


def config_from_dict(data: dict, source: str = "(dict)", overrides: list[str] | None = None) -> RunConfig:
    """Validate a config mapping; `overrides` (already applied) only name their values in errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"config {source} must be a mapping with sections model, data, training, ...")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source, override_keys(overrides))) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    data = read_yaml_file(path, "config file", "configs/")
    return config_from_dict(apply_overrides(data, overrides), str(path), overrides)


def config_differences(saved, current: RunConfig, sections: tuple[str, ...] | None = None) -> list[str]:
    """The `section.key`s (of `sections`, default all) in which a saved run config differs from `current`, the
    saved one read with today's schema first (a key added since then takes its default, so an older run can
    still be resumed)."""
    if not isinstance(saved, dict):
        raise ConfigError(f"a saved run config must be a mapping, found a {type(saved).__name__}; was the file edited?")
    try:
        saved = config_from_dict(saved).to_dict()
    except ConfigError:
        pass
    now = current.to_dict()
    if sections is not None:
        saved = {k: v for k, v in saved.items() if k in sections}
        now = {k: v for k, v in now.items() if k in sections}
    keys = sorted({(sec, k) for d in (saved, now) for sec, vals in d.items() if isinstance(vals, dict) for k in vals})
    return [
        f"{sec}.{k}"
        for sec, k in keys
        if not isinstance(saved.get(sec), dict) or saved[sec].get(k) != now.get(sec, {}).get(k)
    ]
