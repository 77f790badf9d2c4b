"""Reading a command's arguments into what the library takes: the matcher and its settings, the reference, the
data, the merger, and the command line as recorded in reports and cards. Each refusal comes before any work."""

from __future__ import annotations

import shlex

from .parser import alignment_flag_fields


def command_line(args) -> str:
    """This command as typed (shell-quoted), for reports and model cards; a `--token` is left out, since
    both are saved and pushed."""
    words, skip = [], False
    for word in args.argv:
        if skip:
            skip = False
        elif word == "--token":
            skip = True
        elif not word.startswith("--token="):
            words.append(word)
    return shlex.join(["hf-permerge", *words])


def matching(args) -> tuple[str, dict]:
    """The matcher and the settings given for it; an option that does not apply to it is an error, not ignored."""
    from pydantic import ValidationError

    from ..alignment.matchers import matcher_settings
    from ..matching import MATCHER_SETTINGS, all_settings_fields

    matcher = args.matcher or "activation"
    given = {k: getattr(args, k) for k in all_settings_fields() if getattr(args, k) is not None}
    settings = matcher_settings(matcher, given)
    stray = [f"--{k.replace('_', '-')}" for k in given if k not in settings]
    if stray:
        raise ValueError(
            f"{', '.join(stray)} does not apply to --matcher {matcher}; drop it or choose the matcher "
            "it belongs to (see --help)"
        )
    try:
        MATCHER_SETTINGS[matcher].model_validate(settings)  # settings that only fail together
    except ValidationError as err:
        raise ValueError(f"--matcher {matcher}: {err.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    return matcher, settings


def reference_args(args) -> dict:
    """--reference / --max-rounds / --heads as `merger.align`'s arguments (checked before anything is loaded)."""
    if args.max_rounds is not None and args.reference != "average":
        raise ValueError("--max-rounds applies to --reference average; add it or drop --max-rounds")
    if args.reference == "average" and (args.matcher or "activation") == "gradient":
        raise ValueError(
            "--reference average is implemented for the activation and weight matchers, not gradient; "
            "drop --reference or choose another --matcher"
        )
    return {
        "reference": args.reference or "net_0",
        "max_rounds": 50 if args.max_rounds is None else args.max_rounds,
        "heads": args.heads or "move",
    }


def device(args):
    """--device as the torch device to run on (default: the GPU when there is one, else the CPU); one this machine
    lacks (`cuda` without CUDA, `cuda:3` with one GPU, a misspelt name) is refused here, before any work."""
    from ..devices import check_device

    return check_device(args.device, cli=True)


def merger_for(args, data: dict | None, on):
    """The merger of the models named, on the device `on` (`device`'s answer), aligning and repairing on `data`
    (`data_source`'s answer) when one was named."""
    from ..merging import PermMerger

    source = args.pair[0] if len(args.pair) == 1 else args.pair
    merger = PermMerger.from_pretrained(
        source,
        device=on,
        token=args.token,
        revision=args.revision,
        allow_different_tokenizers=getattr(args, "allow_different_tokenizers", False),
    )
    if data is not None:
        merger.use_data(**{**data, "dataset": data["dataset"] or merger.dataset_name()})
    return merger


def data_source(args) -> dict | None:
    """--dataset / --data-dir as `merger.use_data`'s arguments, checked before anything is loaded or written: a
    catalog name as it is, anything else read as a `datasets.Dataset` (a saved folder, a folder of images, a Hub
    id; only a Hub id is named in the card, a local folder's path is not pushed). None when neither was given."""
    from ..data.catalog import DATASETS

    options = [
        f"--{k.replace('_', '-')}" for k in ("dataset", "dataset_split", "data_dir") if getattr(args, k) is not None
    ]
    if options and args.matcher == "weight" and not getattr(args, "repair", None):
        raise ValueError(
            f"--matcher weight reads no data, so {', '.join(options)} would be ignored; drop "
            f"{'it' if len(options) == 1 else 'them'}"
            + (" (or add --repair, which reads them)" if hasattr(args, "repair") else "")
        )
    if getattr(args, "text_column", None) is not None and (args.dataset is None or args.dataset in DATASETS):
        raise ValueError("--text-column names a column of a text --dataset (a file, folder or Hub id); add one")
    if args.dataset is None or args.dataset in DATASETS:
        if args.dataset_split is not None:
            raise ValueError(
                "--dataset-split picks a split of a --dataset folder or Hub id; a catalog data set is "
                "read from its training split: drop --dataset-split"
            )
        return {"dataset": args.dataset, "data_dir": args.data_dir} if options else None
    if args.data_dir is not None:
        raise ValueError(
            f"--data-dir names the files of a catalog data set ({', '.join(DATASETS)}); "
            f"--dataset {args.dataset} brings its own: drop --data-dir"
        )
    from ..data.loading import load_dataset_source

    text_column = getattr(args, "text_column", None)
    data, hub_id = load_dataset_source(args.dataset, args.dataset_split, text_column)
    return {"dataset": data, "name": hub_id, **({"text_column": text_column} if text_column else {})}


def check_merge_options(args) -> None:
    """Matching options that this merge would silently ignore are an error: --vanilla aligns nothing, and
    --permutations replaces the alignment."""
    if not (args.vanilla or args.permutations):
        return
    data = () if args.repair else ("dataset", "dataset_split", "data_dir")  # REPAIR reads data even then
    given = [f"--{k.replace('_', '-')}" for k in (*alignment_flag_fields(), *data) if getattr(args, k) is not None]
    if given:
        mode, why = (
            ("--vanilla", "a vanilla average aligns nothing")
            if args.vanilla
            else ("--permutations", "the permutations are loaded, not found")
        )
        raise ValueError(
            f"{', '.join(given)} cannot be used with {mode}: {why}, so the matching options would be "
            f"ignored; drop {', '.join(given)} or {mode}"
        )


def heldout_text(args) -> dict | None:
    """evaluate's --dataset (held-out text for language models given as folders) as {"dataset", "text_column"},
    read before any model is loaded; None when not given."""
    if args.dataset is None:
        for flag in ("dataset_split", "text_column", "align_dataset"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} qualifies --dataset (held-out text); add --dataset")
        return None
    from pathlib import Path

    from ..data.loading import load_dataset_source

    split = args.dataset_split
    if split is None and (Path(args.dataset) / "test").is_dir():  # a saved DatasetDict: its held-out split
        split = "test"
    data, _ = load_dataset_source(args.dataset, split, args.text_column)
    align = getattr(args, "align_dataset", None)
    if align is not None and Path(align).expanduser().resolve() == Path(args.dataset).expanduser().resolve():
        raise ValueError("--align-dataset is the held-out --dataset: align on other text, or drop --align-dataset")
    aligned_on = load_dataset_source(align, None, args.text_column)[0] if align is not None else None
    return {"dataset": data, "text_column": args.text_column, "align": aligned_on}


def check_streamed_options(args) -> None:
    """merge --streamed merges two checkpoint folders by weight matching, or by activation matching on a text
    --dataset; what it cannot do is refused by name."""
    if len(args.pair) != 2:
        raise ValueError(
            f"--streamed merges two model folders (A B), got {len(args.pair)} argument(s); name both checkpoints"
        )
    args.matcher = args.matcher or "weight"
    if args.matcher not in ("weight", "activation"):
        raise ValueError(
            f"--streamed aligns by weight or activation matching, not {args.matcher}; choose --matcher weight or "
            "--matcher activation"
        )
    if args.matcher == "activation" and args.dataset is None:
        raise ValueError(
            "--streamed --matcher activation reads the models' activations on text: name it with --dataset (a text "
            "file, a save_to_disk folder or a Hub id)"
        )
    given = [
        flag
        for flag, value in (
            ("--all", args.all),
            ("--vanilla", args.vanilla),
            ("--permutations", args.permutations),
            ("--repair", args.repair),
            ("--checkpoint", args.checkpoint),
            ("--dataset", args.dataset if args.matcher == "weight" else None),
            ("--device", args.device),
            ("--reference", args.reference),
        )
        if value
    ]
    if given:
        raise ValueError(
            f"{', '.join(given)} cannot be used with --streamed (weight matching of two checkpoint folders, on "
            "the CPU); drop it or drop --streamed"
        )
