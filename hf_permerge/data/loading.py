"""Load a split as a `datasets.Dataset` with the Hub's schema (the interchange format)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..io_utils import missing_folder_error, only_a_local_path
from .catalog import DATASETS, FASHION_MNIST_DIR, dataset_info
from .idx import find_idx_pair, read_idx

SPLITS = ("train", "test")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not available; choose one of {list(SPLITS)}")


def local_idx_dir(name: str, data_dir: str | os.PathLike | None) -> Path | None:
    """The folder of IDX files to read for `name`, or None to go through `datasets.load_dataset`."""
    if data_dir is not None:
        path = Path(data_dir)
        if not path.is_dir():
            raise FileNotFoundError(
                f"data directory {path} does not exist; point data_dir at a folder with the IDX files "
                "or leave it unset to use the default"
            )
        return path
    if name == "fashion_mnist" and Path(FASHION_MNIST_DIR).is_dir():
        return Path(FASHION_MNIST_DIR)
    return None


def load_idx_arrays(name: str, split: str, data_dir=None) -> tuple[np.ndarray, np.ndarray] | None:
    """(images uint8 (N, H, W), labels int64) from local IDX files, or None when there are none."""
    _check_split(split)
    folder = local_idx_dir(name, data_dir)
    if folder is None:
        return None
    images_path, labels_path = find_idx_pair(folder, split)
    images, labels = read_idx(images_path), read_idx(labels_path).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    return images, labels


def load_hub_dataset(name: str, split: str, **kwargs):
    """`datasets.load_dataset` with an error that says how to get the data when offline."""
    import datasets  # keep lazy: +1.2 s at import, paid only where a datasets.Dataset is made or read

    info = dataset_info(name)
    try:
        return datasets.load_dataset(info.hub_id, split=split, **kwargs)
    except Exception as err:  # network errors come in many types
        hint = "`apt-get install dataset-fashion-mnist` (the real data, offline), " if name == "fashion_mnist" else ""
        raise RuntimeError(
            f"could not load {name!r} ({info.hub_id}) from the Hub: {err}. The Hub is unreachable or the "
            f"data is not cached; get it with {hint}data.data_dir set to a folder with the data, or one run online "
            "so that `datasets` caches it."
        ) from err


def load_image_dataset(name: str = "fashion_mnist", split: str = "train", data_dir=None, **load_kwargs):
    """A split as a `datasets.Dataset` with columns `image` (PIL) and `label` (ClassLabel with names).

    Fashion-MNIST comes from local IDX files (the Debian package, or `data_dir`) when present,
    otherwise from the Hub; MNIST and CIFAR-10 come from the Hub (or IDX files in `data_dir`).
    """
    import datasets  # keep lazy: +1.2 s at import, paid only where a datasets.Dataset is made or read

    info = dataset_info(name)
    _check_split(split)
    arrays = load_idx_arrays(name, split, data_dir)
    if arrays is None:
        ds = load_hub_dataset(name, split, **load_kwargs)
        if info.image_column != "image":
            ds = ds.rename_column(info.image_column, "image")
        return ds
    images, labels = arrays
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(info.class_names))}
    )
    return datasets.Dataset.from_dict({"image": list(images), "label": labels}, features=features)


def check_image_dataset(ds) -> None:
    """A `datasets.Dataset` with an 'image' column (and optionally 'label'); other shapes get the fix named."""
    if isinstance(getattr(ds, "column_names", None), dict):  # a DatasetDict
        raise ValueError(
            f"got a DatasetDict with splits {sorted(ds.column_names)}; pass one split, e.g. "
            f"ds[{next(iter(ds.column_names))!r}]"
        )
    if "image" not in ds.column_names:
        guess = next((c for c in ds.column_names if c.lower() in ("img", "images", "pixel_values", "pixels")), None)
        fix = f"ds = ds.rename_column({guess!r}, 'image')" if guess else "ds = ds.rename_column(<its name>, 'image')"
        raise ValueError(
            f"dataset lacks an 'image' column (image models) and an 'input_ids' or 'text' column (language models); "
            f"its columns are {ds.column_names}: rename the images' column ({fix}), or for text name the column "
            "(--text-column / text_column=...)"
        )


_TEXT_FILE_FIX = (
    "give a UTF-8 text file with one example per line (.txt), one JSON object per line with a 'text' or "
    "'input_ids' field (.jsonl), or a CSV file with a header row and a text column (.csv)"
)
_EMPTY_FIX = "give a data set with examples (for text models: non-empty lines of text, or input_ids)"


def _check_not_blank(path: Path) -> None:
    """Refuse a file with nothing but whitespace (an empty file is no data set, whatever its suffix)."""
    with path.open("rb") as f:
        head = f.read(1 << 20)
    if not head.strip() and path.stat().st_size <= len(head):
        raise ValueError(f"{path} holds no examples (it is empty or blank); {_EMPTY_FIX}")


def _saved_empty(path: Path) -> bool:
    """A `save_to_disk` folder of a data set with no rows: `datasets` writes it no data file, then cannot read it."""
    import json

    try:
        return json.loads((path / "state.json").read_text()).get("_data_files") == []
    except (OSError, ValueError, AttributeError):
        return False


def _first_cause(err: BaseException) -> str:
    """The innermost cause's message, on one line: `datasets` wraps a parse error in a DatasetGenerationError whose
    own message says only that generating the split failed."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:200]


TEXT_FILES = {".txt": "text", ".jsonl": "json", ".csv": "csv"}
"""Local files read as a text data set, by suffix -> the `datasets` builder (a .txt file: one 'text' per line)."""


def load_dataset_source(source: str, split: str | None = None, text_column: str | None = None):
    """One split of a data set a user names on the command line: (a `datasets.Dataset`, its Hub id or None).
    `source` is a folder written by `save_to_disk`, a folder of images (`imagefolder`: one subfolder per class),
    a text file (`TEXT_FILES`), or a Hub dataset id; `split` (default train) picks a split of a DatasetDict or a Hub id, and is an error for
    a folder that holds one split only. The images' schema (or, for text, the `input_ids` / `text_column`
    column) is checked here, before any model is loaded."""
    import datasets  # keep lazy: +1.2 s at import, paid only where a datasets.Dataset is made or read

    path = Path(source).expanduser()
    hub_id = None
    if path.is_dir():
        saved = any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))
        try:
            ds = (
                datasets.load_from_disk(str(path))
                if saved
                else datasets.load_dataset("imagefolder", data_dir=str(path))
            )
        except Exception as err:  # the builders raise many types; the message says what was wrong
            if _saved_empty(path):
                raise ValueError(f"{path} holds no examples (a data set saved with no rows); {_EMPTY_FIX}") from None
            raise ValueError(
                f"could not read {path} as a data set ({err}); give a folder written by "
                "Dataset.save_to_disk, or a folder of images with one subfolder per class"
            ) from err
    elif path.is_file() and path.suffix in TEXT_FILES:
        shown = not datasets.are_progress_bars_disabled()
        datasets.disable_progress_bars()  # "Generating train split": a bar for a fraction of a second
        quiet = logging.getLogger("datasets")  # its builders log each parse failure with a traceback
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            _check_not_blank(path)
            ds = datasets.load_dataset(TEXT_FILES[path.suffix], data_files=str(path), split="train")
        except ValueError as err:
            if "holds no examples" in str(err):
                raise
            raise ValueError(
                f"could not read {path} as a {path.suffix} file ({_first_cause(err)}); {_TEXT_FILE_FIX}"
            ) from None
        except Exception as err:  # noqa: BLE001 - the builders raise many types (DatasetGenerationError, ...)
            raise ValueError(
                f"could not read {path} as a {path.suffix} file ({_first_cause(err)}); {_TEXT_FILE_FIX}"
            ) from None
        finally:
            quiet.setLevel(level)
            if shown:
                datasets.enable_progress_bars()
    elif path.exists():
        raise ValueError(
            f"{path} is a file, not one of {', '.join(TEXT_FILES)}; give a text file (one example per line), a folder "
            "written by Dataset.save_to_disk, or a folder of images with one subfolder per class"
        )
    elif only_a_local_path(source):
        raise missing_folder_error(path)
    elif len(path.parts) == 1:
        raise ValueError(
            f"{source!r} is not a data set of the catalog ({', '.join(DATASETS)}), a folder, nor a "
            "Hub dataset id (owner/name); check the name or the path"
        )
    elif Path(path.parts[0]).is_dir():  # `data/nope` beside a data/ folder: a mistyped path, not a Hub id
        raise missing_folder_error(
            path, f"; if {source} is a Hub dataset id, run where no folder {path.parts[0]} is beside you"
        )
    else:
        try:
            ds, hub_id = datasets.load_dataset(source, split=split or "train"), source
        except Exception as err:  # network and missing-repo errors come in many types
            raise ValueError(
                f"could not load the Hub dataset {source!r} (split {split or 'train'!r}): {err}. Offline, "
                "save it once online (load_dataset(...).save_to_disk(FOLDER)) and pass the folder"
            ) from err
    if isinstance(ds, datasets.DatasetDict):
        if not ds:
            raise ValueError(f"{source} holds no splits; {_EMPTY_FIX}")
        if (split or "train") not in ds:
            raise ValueError(
                f"{source} has the splits {sorted(ds)}, not {split or 'train'!r}; choose one with --dataset-split"
            )
        ds = ds[split or "train"]
    elif split not in (None, "train") and hub_id is None:
        raise ValueError(f"{source} holds one split only (no splits to choose from); drop --dataset-split")
    if len(ds) == 0:
        raise ValueError(f"{source} holds no examples; {_EMPTY_FIX}")
    if text_column is not None or "image" not in ds.column_names and {"text", "input_ids"} & set(ds.column_names):
        from .tokens import check_text_columns

        check_text_columns(ds, text_column)  # text for a language model
        return ds, hub_id
    for column, kind in (("image", datasets.Image), ("label", datasets.ClassLabel)):  # e.g. CIFAR-10's "img"
        candidates = [c for c, f in ds.features.items() if isinstance(f, kind)]
        if column not in ds.column_names and len(candidates) == 1:
            ds = ds.rename_column(candidates[0], column)
    check_image_dataset(ds)
    return ds, hub_id
