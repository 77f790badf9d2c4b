"""Which data a merge aligns and repairs on when the caller gives none, how it is named, and its conversion to
the tensors the matchers take (`as_tensor_split`: only the seeded subset that will be used)."""

from __future__ import annotations

from pathlib import Path

from ..alignment.base import fits, input_shape_text
from ..data.catalog import DATASETS, dataset_info
from ..data.loading import check_image_dataset
from ..data.tensors import TensorSplit, load_tensors, recorded_normalisation, subset_indices
from ..data.tokens import TokenSplit, check_text_columns, model_token_split
from ..io_utils import only_a_local_path
from .inputs import as_tensor_split
from .nets import Nets

GIVEN = "given by the caller"
"""What alignment.json / merge_config.json say of data the caller passed (we cannot name it)."""


class MergeData:
    """The pair's training split (Fashion-MNIST for models without a pair.json), unless `use` chose other data."""

    def __init__(self, pair: dict | None):
        self.pair = pair
        self.choice: dict | None = None
        """{"dataset", "data_dir"} (and "given", a `datasets.Dataset`) of `use`; None: the pair's own."""
        self.used = False
        self.text_column: str | None = None
        """The column of a text data set to tokenize (None: `input_ids`, else a 'text' column)."""

    def use(self, dataset, data_dir=None, name: str | None = None) -> None:
        if isinstance(dataset, str):
            dataset_info(dataset)  # an unknown name is an error now, not at align
            self.choice = {"dataset": dataset, "data_dir": data_dir}
            return
        if not hasattr(dataset, "column_names"):
            raise TypeError(
                f"use_data takes a catalog name (e.g. 'fashion_mnist') or a datasets.Dataset, got "
                f"{type(dataset).__name__}"
            )
        if data_dir is not None:
            raise ValueError(
                "data_dir names the files of a catalog data set; a datasets.Dataset brings its own "
                "images: drop data_dir"
            )
        if name is not None and (
            not isinstance(name, str) or only_a_local_path(name) or len(Path(name).parts) != 2 or Path(name).exists()
        ):
            raise ValueError(
                f"name={name!r} is not a Hub dataset id (owner/name); it is written into the model card and "
                "merge_config.json, so a local path is never taken: pass the Hub id, or no name"
            )
        if (
            "image" in dataset.column_names
            or "text" not in dataset.column_names
            and "input_ids" not in dataset.column_names
            and self.text_column is None
        ):
            check_image_dataset(dataset)
        else:
            check_text_columns(dataset, self.text_column)
        self.choice = {"dataset": name, "data_dir": None, "given": dataset}

    def given(self):
        """The `datasets.Dataset` of `use`, or None when the default data is a catalog data set."""
        return (self.choice or {}).get("given")

    def dataset_name(self) -> str | None:
        if self.choice is not None:
            return self.choice["dataset"]
        return (self.pair or {}).get("config", {}).get("data", {}).get("dataset", "fashion_mnist")

    def data_dir(self):
        if self.choice is not None:
            return self.choice["data_dir"]
        return (self.pair or {}).get("config", {}).get("data", {}).get("data_dir")

    def tensor_split(self, nets: Nets, data, num_examples: int | None = None, seed: int = 0) -> TensorSplit:
        """`data` converted for net 0, as far as the seeded subset of `num_examples` goes (see PermMerger); for a
        text model, a `TokenSplit` (`text_split`)."""
        model = nets.load(0)
        if nets.is_text(model):
            return self.text_split(nets, data, num_examples, seed)
        if isinstance(data, TensorSplit):
            return as_tensor_split(data, model)
        if hasattr(data, "select") and num_examples is not None and num_examples < len(data):
            data = data.select(subset_indices(len(data), num_examples, seed).tolist())
        return as_tensor_split(data, model, processor=nets.image_processor_of(model))

    def text_split(self, nets: Nets, data, num_examples: int | None = None, seed: int = 0) -> TokenSplit:
        """Sequences for a text model: a `TokenSplit` as it is, or a `datasets.Dataset` of `input_ids` (+
        `attention_mask`) or of text (`self.text_column`, tokenized by the tokenizer saved beside net 0), its seeded
        subset of `num_examples` sequences only."""
        model = nets.load(0)
        if isinstance(data, TokenSplit):
            return data.subset(num_examples, seed)
        if not hasattr(data, "column_names"):
            raise TypeError(
                f"cannot align a text model on {type(data).__name__}: pass a datasets.Dataset with input_ids (and "
                "attention_mask) or a text column, or use matcher='weight', which needs no data"
            )
        return model_token_split(data, nets.tokenizer(), model.config, self.text_column, num_examples, seed)

    def recorded_normalisation(self, nets: Nets) -> tuple | None:
        """The (mean, std) net 0's config records (what our nets were trained with), for the catalog data set;
        None for models that record none (the catalog's normalisation then), or when the caller gave the data."""
        name = self.dataset_name()
        if name not in DATASETS or self.given() is not None:
            return None
        return recorded_normalisation(nets.load(0), name)

    def default(self, nets: Nets, purpose: str, num_examples: int | None = None, seed: int = 0) -> TensorSplit:
        """The default data, if it fits the models; `purpose` ("align" or "repair") picks the way out named. A
        `datasets.Dataset` is converted as far as `num_examples` (seeded subset) goes, as `tensor_split` does."""
        if nets.is_text(nets.load(0)) and self.given() is None:
            fix = (
                "pass text the models can read (merger.align(dataset) with a datasets.Dataset of input_ids or a "
                "text column; on the command line --dataset and --text-column), or use the weight matcher, which "
                "needs no data"
                if purpose == "align"
                else "pass repair_data"
            )
            raise ValueError(f"text models have no default data set: {fix}")
        if self.given() is not None:
            data = self.tensor_split(nets, self.given(), num_examples, seed)
            if isinstance(data, TokenSplit):
                self.used = True
                return data
        else:
            data = load_tensors(
                self.dataset_name(), "train", nets.device, self.data_dir(), self.recorded_normalisation(nets)
            )
        if not fits(data.pixel_values, nets.load(0)):
            fix = (
                "pass the data they were trained on (merger.align(dataset)); on the command line, name it with "
                "--dataset / --data-dir, or use --matcher weight, which needs no data"
                if purpose == "align"
                else "pass the data they were trained on (merge(..., repair_data=dataset)); on the command line, name "
                "it with --dataset / --data-dir, or drop --repair"
            )
            raise ValueError(
                f"the default data, {self.dataset_name() or 'the data set given'} training images of "
                f"shape {tuple(data.pixel_values.shape[1:])}, do not fit these models, which take "
                f"{input_shape_text(nets.load(0))}: {fix}"
            )
        self.used = True
        return data

    def label(self) -> str | None:
        """What alignment.json / merge_config.json say the default data was when `use` chose it (None: the
        pair's training split, as before `use_data` existed)."""
        if self.choice is None:
            return None
        given = self.given()
        if given is not None:
            split = getattr(given, "split", None)  # e.g. load_dataset(id, split="test") remembers "test"
            if self.dataset_name() is None:
                return "a data set without a Hub id (a local folder, or an unnamed datasets.Dataset)"
            return f"{self.dataset_name()} {split} split" if split else self.dataset_name()
        return f"{self.dataset_name()} training split"

    def described(self, alignment: dict, last_merge: dict | None) -> str | None:
        """The data set a card and merge_config.json name: the pair's (its nets were trained on it, whatever they
        were aligned on), else the default data the merge used, and none when the caller gave the data
        unnamed (we cannot name it)."""
        if self.pair is not None:
            return self.pair.get("config", {}).get("data", {}).get("dataset", "fashion_mnist")
        caller = alignment.get("data") == GIVEN or (last_merge or {}).get("repair_data") == GIVEN
        return self.dataset_name() if self.used and not caller else None
