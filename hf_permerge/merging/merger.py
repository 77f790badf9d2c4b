"""PermMerger: align N nets onto the first, then merge trained weights, inits or any saved step.

The facade over the parts that do the work: `nets` (loading), `merge_data` (the default data), `aligning`,
`averaging` (merging proper, with REPAIR), `saving` (merged folders, permutation folders, cards, the Hub).
"""

from __future__ import annotations

import numbers
from pathlib import Path

import torch

from ..alignment import Permutations
from ..devices import check_device
from . import saving
from .aligning import align_nets
from .averaging import average_state_dicts, check_repair, merge_nets, permuted, permuted_state
from .merge_data import MergeData
from .nets import Nets, check_same_architecture, net_fingerprint
from .repair import DEFAULT_NUM_EXAMPLES as DEFAULT_REPAIR_EXAMPLES
from .saving import MARKER, PERMUTATIONS_MARKER, SAVE_TARGETS, check_save_target
from .sources import NetSource, load_sources

__all__ = [
    "PermMerger",
    "MARKER",
    "PERMUTATIONS_MARKER",
    "SAVE_TARGETS",
    "check_save_target",
    "average_state_dicts",
    "check_same_architecture",
    "net_fingerprint",
]


class PermMerger:
    """Load N nets, align them onto net 0, merge.

    merger = PermMerger.from_pretrained("runs/pair")      # or a Hub repo id, or [dir_a, dir_b, ...]
    merger.align()                                         # activation matching on 10k training images
    merged = merger.merge(alpha=0.5)                       # (1 - alpha) * theta_0 + alpha * pi(theta_1)
    init_avg = merger.merge(alpha=0.5, checkpoint="init")  # the same permutation on the untrained inits
    merger.save_pretrained("runs/merged")
    """

    def __init__(
        self,
        sources: list[NetSource],
        pair: dict | None = None,
        device=None,
        example_inputs=None,
        image_processor=None,
        allow_different_tokenizers: bool = False,
    ):
        self.pair = pair
        self._data = MergeData(pair)
        self._nets = Nets(
            sources,
            device,
            example_inputs,
            image_processor,
            catalog_data=lambda: (self._data.dataset_name(), self._data.data_dir()),
            allow_different_tokenizers=allow_different_tokenizers,
        )
        self.permutations: list[Permutations] | None = None
        self.alignment: dict = {}
        self._last_merge: dict | None = None
        self._last_model = None

    @classmethod
    def from_pretrained(
        cls,
        pair_or_models,
        device=None,
        example_inputs=None,
        *,
        token: str | None = None,
        revision: str | None = None,
        image_processor=None,
        allow_different_tokenizers: bool = False,
    ) -> PermMerger:
        """A pair folder, the Hub repo id of a pair, or a list of >= 2 model folders / repo ids.

        token, revision: for repo ids (a private repo; a branch, tag or commit); the token defaults to HF_TOKEN
        or `hf auth login`'s, and is never stored.
        example_inputs: for models without a `permutation_spec()` (any HF image classifier), the inputs to
        trace one with (a pixel tensor); default two test images of the pair's data set (Fashion-MNIST).
        image_processor: for models saved without one (e.g. `AutoImageProcessor.from_pretrained(<base model>, trust_remote_code=False)`):
        it converts your `datasets.Dataset` for them and is saved beside the merged model, so that
        `pipeline("image-classification")` loads it. Net 0's own is used when this is None.
        device: where the nets are loaded and merged (default: the CPU); one this machine lacks is refused at once.
        allow_different_tokenizers: merge text models whose tokenizers differ (refused otherwise, naming the first
        differing ids); the card and merge_config.json then say how they differ.
        """
        if device:
            check_device(device)  # before any download
        sources, pair = load_sources(pair_or_models, token=token, revision=revision)
        return cls(sources, pair, device, example_inputs, image_processor, allow_different_tokenizers)

    # -- the nets --------------------------------------------------------------------------------
    sources = property(lambda self: self._nets.sources)
    device = property(lambda self: self._nets.device)
    spec = property(lambda self: self._nets.spec)
    traced = property(
        lambda self: self._nets.traced,
        doc="The `TracedSpec` when net 0 declares no spec of its own (what was traced, what was skipped).",
    )
    example_inputs = property(
        lambda self: self._nets.example_inputs, lambda self, value: setattr(self._nets, "example_inputs", value)
    )
    image_processor = property(
        lambda self: self._nets.image_processor,
        lambda self, value: setattr(self._nets, "image_processor", value),
        doc="For models saved without an image processor: converts a `datasets.Dataset` for "
        "them and is saved beside the merged model (our models bring their own).",
    )
    default_checkpoint = property(
        lambda self: self._nets.default_checkpoint,
        doc="The checkpoint that merging, aligning and loading use unless told otherwise: `final`, or the one "
        "whose folders were passed (`[a/net_0/step-50, b/net_0/step-50]` merges step-50).",
    )

    def is_text(self) -> bool:
        """Whether the nets are language models (they take tokens, not pixels)."""
        return self._nets.is_text(self._nets.load(0))

    @property
    def num_nets(self) -> int:
        return len(self._nets)

    def load(self, i: int, checkpoint: str | None = None):
        """Net i at a checkpoint (default: `default_checkpoint`), as saved (not permuted), on the merger's
        device, in eval mode."""
        return self._nets.load(i, checkpoint)

    def fingerprints(self, checkpoint: str | None = None) -> list[str]:
        """Each net's `net_fingerprint` at a checkpoint: saved beside permutations, so that they are never
        applied to other nets."""
        return self._nets.fingerprints(checkpoint)

    # -- the data --------------------------------------------------------------------------------
    @property
    def data(self) -> dict | None:
        """{"dataset", "data_dir"} to align and repair on by default, when not the pair's own (`use_data`)."""
        return self._data.choice

    def use_data(self, dataset, data_dir=None, name: str | None = None, text_column: str | None = None) -> None:
        """Align and repair on this data unless given data (by default: the pair's data set, and Fashion-MNIST for
        models without a pair.json). `dataset` is a catalog name (e.g. from a config), read from `data_dir` if
        given, or a `datasets.Dataset` (an `image` column; `name`, its Hub id if it has one, is what the model card
        and merge_config.json call it; a local path never is)."""
        if text_column is not None:
            self._data.text_column = text_column
        self._data.use(dataset, data_dir, name)

    def recorded_normalisation(self) -> tuple | None:
        """The (mean, std) net 0's config records (what our nets were trained with), for the catalog data set;
        None for models that record none (the catalog's normalisation then)."""
        return self._data.recorded_normalisation(self._nets)

    def dataset_name(self) -> str | None:
        return self._data.dataset_name()

    def data_dir(self):
        return self._data.data_dir()

    def tensor_split(self, data, num_examples: int | None = None, seed: int = 0):
        """Data for aligning or repairing as a `TensorSplit`: a `datasets.Dataset` goes through our
        normalisation (our models) or, for any other model, the image processor saved beside net 0.
        Only the `num_examples` images the matcher or REPAIR will use are converted: the same seeded
        subset, in the same order, that `TensorSplit.subset(num_examples, seed)` takes."""
        return self._data.tensor_split(self._nets, data, num_examples, seed)

    def token_split(self, data, num_examples: int | None = None, seed: int = 0, text_column: str | None = None):
        """Sequences for text models as a `TokenSplit`: a `datasets.Dataset` of `input_ids` (+ `attention_mask`) or
        of text in `text_column` (tokenized by the tokenizer saved beside net 0), checked against the models'
        positions and vocabulary; its seeded subset of `num_examples` sequences only."""
        if text_column is not None:
            self._data.text_column = text_column
        return self._data.text_split(self._nets, data, num_examples, seed)

    def described_dataset(self) -> str | None:
        """The data set a card and merge_config.json name: the pair's (its nets were trained on it, whatever they
        were aligned on), else the default data the merge used, and none when the caller gave the data
        unnamed (we cannot name it)."""
        return self._data.described(self.alignment, self._last_merge)

    # -- aligning --------------------------------------------------------------------------------
    def align(
        self,
        dataset=None,
        matcher: str = "activation",
        checkpoint: str | None = None,
        reference: str = "net_0",
        max_rounds: int = 50,
        text_column: str | None = None,
        heads: str = "move",
        **settings,
    ) -> list[Permutations]:
        """Align every net onto net 0 at `checkpoint`; returns one `Permutations` per net (net 0: identity).

        `dataset` is a `datasets.Dataset` (Hub schema) or a `TensorSplit`; by default the pair's
        training split (the matcher takes its fixed subset of `num_examples`). The weight matcher uses no data.
        reference: "net_0" (the paper's: each net matched to net 0), or "average": starting from that, each net
        is matched to the average of the others, for rounds until none changes (at most `max_rounds`; Git
        Re-Basin's MergeMany), which lines the nets up with each other for `merge_all`. Net 0 stays as it is.
        Text models: `dataset` has `input_ids` (and `attention_mask`), or text in `text_column` (default 'text')
        tokenized by the tokenizer saved beside net 0; statistics count real tokens, never padding.
        heads: "move" (whole attention heads move where the spec couples them) or "keep" (units permute within
        each head, every head stays in place: the ablation that asks whether moving heads matters).
        """
        if text_column is not None:
            self._data.text_column = text_column
        perms, record = align_nets(
            self._nets, self._data, dataset, matcher, checkpoint, reference, max_rounds, heads, **settings
        )
        self.set_permutations(perms, **record)
        return perms

    def set_permutations(self, perms: list[Permutations], **alignment) -> None:
        """Use permutations found elsewhere (e.g. at another step: the paper's perm@x)."""
        if len(perms) != self.num_nets:
            raise ValueError(f"need {self.num_nets} permutations (one per net, net 0's the identity), got {len(perms)}")
        for p in perms:
            p.validate(self.spec)
        self.permutations = list(perms)
        self.alignment = dict(alignment)
        self._last_merge = self._last_model = None  # a merge made with other permutations is not saved as this one

    def _require_alignment(self) -> list[Permutations]:
        if self.permutations is None:
            raise RuntimeError("no permutations yet: call merger.align() first (or set_permutations)")
        return self.permutations

    # -- merging ---------------------------------------------------------------------------------
    def permuted_state(self, i: int, checkpoint: str | None = None, permute: bool = True) -> dict:
        return permuted_state(self._nets, self._require_alignment, i, checkpoint, permute)

    def permuted(self, i: int, checkpoint: str | None = None):
        """Net i permuted onto net 0: the same function as net i, its units lined up with net 0's."""
        return permuted(self._nets, self._require_alignment, i, checkpoint)

    def check_repair(self, repair: str | None) -> None:
        """Refuse a repair mode that cannot apply to these nets, before any alignment or averaging is spent."""
        check_repair(self._nets, repair)

    def merge(
        self,
        alpha: float = 0.5,
        checkpoint: str | None = None,
        other: int = 1,
        permute: bool = True,
        repair: str | None = None,
        repair_data=None,
        repair_examples: int | None = DEFAULT_REPAIR_EXAMPLES,
    ):
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
        if self._nets.check_net(other, "other") == 0:
            raise ValueError(f"other must name a net 1..{self.num_nets - 1} (net 0 is the reference), got 0")
        return self._merge(
            [0, other],
            [1 - float(alpha), float(alpha)],
            checkpoint,
            permute,
            repair,
            repair_data,
            repair_examples,
            alpha=float(alpha),
        )

    def merge_all(
        self,
        checkpoint: str | None = None,
        k: int | None = None,
        permute: bool = True,
        repair: str | None = None,
        repair_data=None,
        repair_examples: int | None = DEFAULT_REPAIR_EXAMPLES,
    ):
        """Uniform average of the first k aligned nets (all by default): the paper's Fig. 3 mid. `repair` as in `merge`."""
        checkpoint = checkpoint or self.default_checkpoint
        k = self.num_nets if k is None else k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_nets:
            raise ValueError(f"k must be in 1..{self.num_nets}, got {k}")
        return self._merge(
            list(range(k)), [1.0 / k] * k, checkpoint, permute, repair, repair_data, repair_examples, alpha=None
        )

    def _merge(self, members, weights, checkpoint, permute, repair, repair_data, repair_examples, alpha):
        """The merge, remembered with its settings (merge_config.json): `save_pretrained` saves this model by
        default, since redoing it could not reproduce a repair on data the caller passed."""
        self._last_model, self._last_merge = merge_nets(
            self._nets,
            self._require_alignment,
            self._data,
            members,
            weights,
            checkpoint,
            permute,
            repair,
            repair_data,
            repair_examples,
            alpha,
        )
        return self._last_model

    def _permuted_merge(self) -> bool:
        """Whether the merge being saved used the permutations (a vanilla average uses none)."""
        return (self._last_merge or {}).get("permuted", True)

    def _last_merged_model(self):
        """The model the last `merge`/`merge_all` returned (alpha 0.5 on the default checkpoint if none yet)."""
        return self._last_model if self._last_model is not None else self.merge(0.5)

    # -- saving and sharing ----------------------------------------------------------------------
    def merge_settings(self) -> dict:
        """merge_config.json: what was merged and how, sources by portable labels (see `saving.merge_settings`)."""
        return saving.merge_settings(self)

    def model_card(self, model, report: dict | None = None, plots=(), command: str | None = None, repo_id=None):
        """The merged model's card (`huggingface_hub.ModelCard`): sources, matcher, merge, measured numbers."""
        return saving.model_card(self, model, report, plots, command, repo_id)

    def save_pretrained(
        self,
        output_dir,
        model=None,
        report: dict | None = None,
        files=(),
        command: str | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Write the merged model (HF folder), image processor, permutations, merge settings and model card.

        `model` defaults to the model the last merge returned (alpha 0.5 if none); permutations are saved only
        when the merge used them; `report` and `files` (plots) go beside it, described in the card. The folder
        appears whole or not at all; an existing folder is refused (see `check_save_target`) unless `overwrite`
        (a merge of ours), which replaces it only once the new folder is whole.
        """
        return saving.save_merged(self, output_dir, model, report, files, command, overwrite)

    def save_aligned(self, i: int, output_dir, checkpoint: str | None = None, overwrite: bool = False) -> Path:
        """Write net i permuted onto net 0 as an ordinary model folder (weights, config, its tokenizer or image
        processor, and `aligned_to.json` saying what it was aligned to): the same function as net i, its units
        lined up with net 0's, so any other merging tool (mergekit's linear, SLERP, TIES) can merge it with net 0."""
        if self._nets.check_net(i) == 0:
            raise ValueError("net 0 is the reference, already aligned with itself; save net 1 or later")
        return saving.save_aligned(self, i, output_dir, checkpoint, overwrite)

    def save_permutations(self, output_dir) -> Path:
        """Write net_i.safetensors + alignment.json; an earlier alignment folder is replaced, a user's never."""
        return saving.save_permutations(self, output_dir)

    def load_permutations(self, folder, check_nets: bool = True) -> list[Permutations]:
        """Permutations saved by `save_permutations` / `hf-permerge align` (or a merged model's permutations/).

        They must have been found for these nets (same number; with `check_nets`, the same weights by
        `fingerprints`): permutations of other nets would merge silently wrong."""
        perms, alignment = saving.read_permutations(folder, self.num_nets, self.fingerprints if check_nets else None)
        self.set_permutations(perms, **alignment)
        return perms

    def push_to_hub(self, repo_id: str, output_dir=None, **kwargs):
        """Save (if not yet saved) and upload the merged folder in one commit; see `hf_permerge.hub`."""
        return saving.push(self, repo_id, output_dir, **kwargs)
