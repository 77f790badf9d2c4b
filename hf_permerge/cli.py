"""The `hf-permerge` command line: config files plus `--set section.key=value` overrides.

Heavy imports (torch, transformers, datasets, evaluate) happen inside the subcommands, so `--help`, `--version`
and argument errors answer at once. The matching flags are derived from the config's pydantic models and
validated by them. A command that writes a folder runs as a job (`_job`): one writer per folder, and a failure
leaves nothing it made and loses nothing that was there.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import shlex
import signal
import sys
import threading

EPILOG = "Docs: README.md. Configs: configs/*.yaml. Every subcommand has --help."


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config with sections model, data, training, alignment, evaluation "
                                  "(see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set training.epochs=1 (repeatable; values parsed as YAML)")


def _add_output_args(p: argparse.ArgumentParser, resumable: bool = False) -> None:
    p.add_argument("--output-dir", "-o", required=True, help="folder to write; refused if it exists and is not empty")
    modes = p.add_mutually_exclusive_group()
    modes.add_argument("--overwrite", action="store_true",
                       help="replace an existing output folder of ours when the new job succeeds (it is written "
                            "beside the old one and swapped in; a failure leaves the old one as it was)")
    if resumable:
        modes.add_argument("--resume", action="store_true", help="continue an interrupted run in --output-dir")


def _common_flags(defaults: bool) -> argparse.ArgumentParser:
    """-v / -q, accepted before or after the subcommand (`hf-permerge -q run ...`, `hf-permerge run -q ...`);
    after it they only override when given (SUPPRESS), so a flag before it is not reset."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    default = False if defaults else argparse.SUPPRESS
    p.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="log debug messages; on an error, print its traceback")
    p.add_argument("-q", "--quiet", action="store_true", default=default, help="no progress bars")
    return p


def _command_line(args) -> str:
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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hf_permerge")
    except PackageNotFoundError:
        return "unknown (not installed)"


class _VersionAction(argparse.Action):
    """--version, read from the installed package's metadata only when asked (a scan of site-packages that
    would otherwise slow every start)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show the program's version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog} {_version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,    # no `--tok` for `--token`: the recorded command leaves out exactly `--token`
        prog="hf-permerge",
        description="Permutation-aware model merging for Hugging Face models: train seeded pairs, align their "
                    "hidden units, merge trained weights and untrained inits, measure loss barriers, share on the Hub.",
        epilog=EPILOG, parents=[_common_flags(defaults=True)])
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add = functools.partial(sub.add_parser, parents=[_common_flags(defaults=False)], allow_abbrev=False)

    p = add("train", help="train N seeded nets (a pair by default) and write a pair folder",
                       description="Train `training.num_nets` nets that differ only in seed (init and data order). "
                                   "Writes OUT/net_i/{init,step-N,final}/ (HF model folders) and OUT/pair.json. "
                                   "Use `accelerate launch examples/train_pair.py` to share the nets among processes.",
                       epilog=EPILOG)
    _add_config_args(p)
    _add_output_args(p, resumable=True)
    p.set_defaults(func=cmd_train)

    p = add("align", help="find the permutations that align every net of a pair onto net 0",
                       description="Match hidden units of each net to net 0 (activation matching with the Hungarian "
                                   "algorithm by default) and write OUT/net_i.safetensors + OUT/alignment.json.",
                       epilog=EPILOG)
    _add_pair_arg(p)
    _add_output_args(p)
    _add_matcher_args(p)
    p.set_defaults(func=cmd_align)

    p = add("merge", help="merge a pair: align, then average weights (trained, init or a step)",
                       description="Writes OUT as an HF model folder (loads with AutoModelForImageClassification after "
                                   "`import hf_permerge`), with merge_config.json, a model card and (unless --vanilla) "
                                   "the permutations.",
                       epilog=EPILOG)
    _add_pair_arg(p)
    _add_output_args(p)
    p.add_argument("--checkpoint", default=None,
                   help="which weights to merge: final, init (the untrained inits) or step-N (default: final, or the "
                        "checkpoint whose folders were passed, e.g. a/net_0/step-50 b/net_0/step-50)")
    weights = p.add_mutually_exclusive_group()   # --all weighs every net 1/N: an --alpha would be ignored
    weights.add_argument("--alpha", type=_finite_float, default=None,
                         help="weight of the permuted other net: (1-alpha)*theta_0 + alpha*pi(theta_1) (default 0.5; "
                              "not with --all)")
    weights.add_argument("--all", action="store_true", help="uniform average of all N aligned nets instead of a pair")
    alignment = p.add_mutually_exclusive_group()  # a vanilla average uses no permutations
    alignment.add_argument("--vanilla", action="store_true",
                           help="average without permuting (the baseline); no alignment is run")
    alignment.add_argument("--permutations",
                           help="use permutations from `hf-permerge align` instead of aligning again")
    p.add_argument("--repair", type=_validated_by("evaluation", "repair"), metavar="{repair,reset_bn}", default=None,
                   help="after averaging: REPAIR (each unit's pre-activation statistics set to the endpoints' "
                        "interpolation) or reset_bn (BatchNorm statistics recomputed), on 5000 images of the data (--dataset)")
    _add_matcher_args(p)
    p.set_defaults(func=cmd_merge)

    p = add("evaluate", help="align a pair and write report.json, plots and the merged model",
                       description="Aligns the pair (config's `alignment` section, from pair.json unless --config), "
                                   "evaluates interpolation curves (vanilla and permuted, trained and init), barriers, "
                                   "n-way averages, and optionally the plane and schedules. Writes OUT/report.json, "
                                   "OUT/*.png, OUT/permutations/ and OUT/merged/ (model + card).",
                       epilog=EPILOG)
    p.add_argument("pair", nargs="+", help="a pair folder, the Hub repo id of a pair, or >= 2 model folders / repo ids "
                                           "(then --config names their data)")
    p.add_argument("--config", help="config whose alignment and evaluation sections (and data.data_dir) to use; model, "
                                    "training and data come from the pair's pair.json (default: the pair's own config); "
                                    "for model folders, the whole config describes them")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override alignment.*, evaluation.* or data.data_dir, e.g. --set evaluation.plane=true")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    _add_output_args(p)
    _add_hub_read_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = add("run", help="the main job: train a pair, align, evaluate, report (train + evaluate)",
                       description="Train `training.num_nets` nets, align them, evaluate curves and barriers, and write "
                                   "OUT/pair/, OUT/report.json, OUT/*.png, OUT/permutations/, OUT/merged/.",
                       epilog=EPILOG)
    _add_config_args(p)
    _add_output_args(p, resumable=True)
    p.set_defaults(func=cmd_run)

    p = add("push", help="upload a merged-model folder or a pair folder to the Hub in one commit",
                       description="Uploads FOLDER (a merged model written by merge/evaluate/run, or a pair folder) to "
                                   "the model repo REPO_ID in one commit, creating it if needed. The token comes from "
                                   "--token, HF_TOKEN or `hf auth login`, and is never printed.",
                       epilog=EPILOG)
    p.add_argument("folder", help="e.g. runs/demo/merged or runs/demo/pair")
    p.add_argument("repo_id", help="namespace/name (the namespace defaults to the token's user)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--revision", help="branch to push to (created if missing)")
    p.add_argument("--commit-message", help="commit message (default: 'Upload ... with hf_permerge')")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    p.add_argument("--token", help="a Hugging Face token (prefer HF_TOKEN or `hf auth login`)")
    p.set_defaults(func=cmd_push)

    p = add("sweep", help="run a grid of runs (a paper figure): one table and one figure; resumable",
                       description="Run every cell of a sweep config (a base run config plus a `sweep:` section with "
                                   "name, experiment and grid; see configs/sweeps/). Each cell trains a pair in "
                                   "OUT/cells/<cell>/ and writes its result.json; cells with a result are skipped, so "
                                   "running the same command again continues a sweep. Writes OUT/results.csv, "
                                   "OUT/summary.csv, OUT/results.json and OUT/<name>.png. Under `accelerate launch "
                                   "-m hf_permerge.cli sweep ...` the processes share the cells (cell i on process "
                                   "i mod the number of processes).",
                       epilog=EPILOG)
    p.add_argument("config", help="sweep YAML: sections model, data, training, alignment, evaluation and sweep "
                                  "(see configs/sweeps/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a base value (training.epochs=1) or a sweep value (sweep.keep_pairs=true, "
                        "sweep.grid.model.width=[32,64]); repeatable, values parsed as YAML")
    p.add_argument("--output-dir", "-o", required=True,
                   help="sweep folder; an existing sweep folder is continued (finished cells are skipped)")
    p.add_argument("--overwrite", action="store_true",
                   help="start the sweep again: replace an existing sweep folder when the new sweep has run")
    p.set_defaults(func=cmd_sweep)
    return parser


ALIGNMENT_FLAGS = {"align_checkpoint": "checkpoint"}
"""The matching flags whose names differ from their `alignment` field's (the others are the field's name)."""


def _alignment_flag_fields() -> dict[str, str]:
    """{argparse dest: alignment field} of every matching flag: each field of the config's `alignment` section."""
    from .config import AlignmentSection

    renamed = {field: dest for dest, field in ALIGNMENT_FLAGS.items()}
    return {renamed.get(name, name): name for name in AlignmentSection.model_fields}


def _validated_by(section: str, field: str):
    """An argparse `type` for the flag that mirrors config field `section.field`: the value is read as YAML (as
    `--set` reads it) and validated by that field's pydantic model, so a flag refuses exactly what the config
    refuses, in the same words."""
    def parse(raw: str):
        from pydantic import ValidationError

        from .config import RunConfig, parse_yaml

        model = RunConfig.model_fields[section].annotation
        try:
            value = parse_yaml(raw)
            model.__pydantic_validator__.validate_assignment(model.model_construct(), field, value)
        except ValidationError as err:
            e = err.errors()[0]
            raise argparse.ArgumentTypeError(f"{e['msg'].removeprefix('Value error, ')} (got {raw!r}; the config's "
                                             f"{section}.{field} refuses it too)") from None
        except Exception as err:                  # YAML that does not parse
            raise argparse.ArgumentTypeError(f"cannot read {raw!r}: {err}") from None
        return value
    parse.__name__ = f"{section}.{field}"       # argparse names the type in some messages
    return parse


def _finite_float(raw: str) -> float:
    value = float(raw)
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number (got {raw!r})")
    return value


def _flag_help(name: str, info) -> str:
    """A matching flag's help: the matchers it applies to, then its field's description."""
    from .matching import MATCHER_SETTINGS, setting_owners

    if name == "matcher":
        return "; ".join(f"{m}: {model.__doc__.strip().rstrip('.')}" for m, model in MATCHER_SETTINGS.items()) + \
            f" (default {info.default})"
    owners = setting_owners().get(name)
    text = (info.description or "").strip()
    return f"{', '.join(owners)}: {text}" if owners else text


def _add_pair_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("pair", nargs="+", help="a pair folder, the Hub repo id of a pair, or >= 2 model folders / repo ids")
    _add_hub_read_args(p)


def _add_hub_read_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Hub (for repo ids)")
    g.add_argument("--revision", help="branch, tag or commit of the repo ids to download (default: main)")
    g.add_argument("--token", help="a token that can read private repos (default: HF_TOKEN or `hf auth login`); "
                                   "never saved, left out of the recorded command")


def _add_matcher_args(p: argparse.ArgumentParser) -> None:
    """One flag per field of the config's `alignment` section (each matcher's settings come from its model in
    `hf_permerge.matching`), validated by that field; each defaults to None ("not given")."""
    from typing import Literal, get_args, get_origin

    from .config import AlignmentSection

    g = p.add_argument_group("matching (each option applies to the matchers named in its help)")
    for dest, name in _alignment_flag_fields().items():
        info = AlignmentSection.model_fields[name]
        flag = f"--{dest.replace('_', '-')}"
        if info.annotation is bool:
            g.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                           help=_flag_help(name, info))
        else:
            choices = get_args(info.annotation) if get_origin(info.annotation) is Literal else None
            g.add_argument(flag, dest=dest, type=_validated_by("alignment", name), default=None,
                           metavar="{" + ",".join(choices) + "}" if choices else None, help=_flag_help(name, info))
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    d = p.add_argument_group("data (activation and gradient matching, --repair)")
    d.add_argument("--dataset", help="the data to align and repair on: a catalog name (fashion_mnist, mnist, cifar10), "
                                     "a folder written by Dataset.save_to_disk, a folder of images with one "
                                     "subfolder per class, or a Hub dataset id (owner/name); default: the pair's "
                                     "data set, or fashion_mnist for model folders")
    d.add_argument("--dataset-split", help="the split of a --dataset folder or Hub id to use (default: train)")
    d.add_argument("--data-dir", help="a folder with a catalog data set's IDX files (default: the system's copy)")


@contextlib.contextmanager
def _job(args, check, keep=None, into: bool = False):
    """Run a command's job on its --output-dir: locked for the whole job (one writer per folder), checked under
    the lock (so two writers cannot both find it free), written beside an existing output that --overwrite
    replaces and swapped in at the end, and on any failure leaving nothing it made (`io_utils.output_job`).
    Yields (the folder to write, whether the library should overwrite there). Under several processes
    (`accelerate launch`), which share the folder, the library's own checks and overwrite apply instead."""
    from pathlib import Path

    from .io_utils import folder_lock, output_job

    target = Path(args.output_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        yield target, args.overwrite
        return
    check()                         # a refusal before anything is made (the lock file, missing parents)
    with folder_lock(target):
        check()                     # again under the lock: two writers cannot both find the folder free
        replace = args.overwrite and not getattr(args, "resume", False) and target.is_dir() and any(target.iterdir())
        with output_job(target, replace, into, keep) as out:
            yield out, args.overwrite and not replace


def _resumable_pair(pair) -> bool:
    """Whether a pair folder holds what `--resume` continues from: an epoch's resume point, or finished nets."""
    return any(pair.glob("net_*/resume-step-*")) or any(pair.glob("net_*/final"))


def _keep_pair(args):
    """What a failed `train` keeps: everything when resuming, the resume state of a new pair when it has one."""
    def keep(folder):
        if args.resume or _resumable_pair(folder):
            return f"kept its resume state in {folder}: --resume continues it"
        return None
    return keep


def _keep_run(args):
    """What a failed `run` keeps: its pair's resume state (the rest is made again by --resume), if any."""
    def keep(folder):
        if args.resume:
            return f"kept what was done in {folder}: --resume continues it"
        if not (_resumable_pair(folder / "pair") or (folder / "pair" / "pair.json").exists()):
            return None
        from .io_utils import _remove

        for entry in folder.iterdir():
            if entry.name != "pair":
                _remove(entry)
        return f"kept the pair's resume state in {folder / 'pair'}: --resume continues the run"
    return keep


def _matching(args) -> tuple[str, dict]:
    """The matcher and the settings given for it; an option that does not apply to it is an error, not ignored."""
    from pydantic import ValidationError

    from .alignment.matchers import matcher_settings
    from .matching import MATCHER_SETTINGS, all_settings_fields

    matcher = args.matcher or "activation"
    given = {k: getattr(args, k) for k in all_settings_fields() if getattr(args, k) is not None}
    settings = matcher_settings(matcher, given)
    stray = [f"--{k.replace('_', '-')}" for k in given if k not in settings]
    if stray:
        raise ValueError(f"{', '.join(stray)} does not apply to --matcher {matcher}; drop it or choose the matcher "
                         "it belongs to (see --help)")
    try:
        MATCHER_SETTINGS[matcher].model_validate(settings)     # settings that only fail together
    except ValidationError as err:
        raise ValueError(f"--matcher {matcher}: {err.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    return matcher, settings


def _reference(args) -> dict:
    """--reference / --max-rounds as `merger.align`'s arguments (checked before anything is loaded)."""
    if args.max_rounds is not None and args.reference != "average":
        raise ValueError("--max-rounds applies to --reference average; add it or drop --max-rounds")
    if args.reference == "average" and (args.matcher or "activation") == "gradient":
        raise ValueError("--reference average is implemented for the activation and weight matchers, not gradient; "
                         "drop --reference or choose another --matcher")
    return {"reference": args.reference or "net_0", "max_rounds": 50 if args.max_rounds is None else args.max_rounds}


def _merger(args, data: dict | None):
    """The merger of the models named, aligning and repairing on `data` (`_data`'s answer) when one was named."""
    import torch

    from .merging import PermMerger

    source = args.pair[0] if len(args.pair) == 1 else args.pair
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    merger = PermMerger.from_pretrained(source, device=device, token=args.token, revision=args.revision)
    if data is not None:
        merger.use_data(**{**data, "dataset": data["dataset"] or merger.dataset_name()})
    return merger


def _data(args) -> dict | None:
    """--dataset / --data-dir as `merger.use_data`'s arguments, checked before anything is loaded or written: a
    catalog name as it is, anything else read as a `datasets.Dataset` (a saved folder, a folder of images, a Hub
    id; only a Hub id is named in the card, a local folder's path is not pushed). None when neither was given."""
    from .data.catalog import DATASETS

    options = [f"--{k.replace('_', '-')}" for k in ("dataset", "dataset_split", "data_dir") if getattr(args, k) is not None]
    if options and args.matcher == "weight" and not getattr(args, "repair", None):
        raise ValueError(f"--matcher weight reads no data, so {', '.join(options)} would be ignored; drop "
                         f"{'it' if len(options) == 1 else 'them'}" + (" (or add --repair, which reads them)"
                                                                       if hasattr(args, "repair") else ""))
    if args.dataset is None or args.dataset in DATASETS:
        if args.dataset_split is not None:
            raise ValueError("--dataset-split picks a split of a --dataset folder or Hub id; a catalog data set is "
                             "read from its training split: drop --dataset-split")
        return {"dataset": args.dataset, "data_dir": args.data_dir} if options else None
    if args.data_dir is not None:
        raise ValueError(f"--data-dir names the files of a catalog data set ({', '.join(DATASETS)}); "
                         f"--dataset {args.dataset} brings its own: drop --data-dir")
    from .data.loading import load_dataset_source

    data, hub_id = load_dataset_source(args.dataset, args.dataset_split)
    return {"dataset": data, "name": hub_id}


def cmd_align(args) -> int:
    from .io_utils import CLI_WORDING
    from .merging.merger import check_save_target

    matcher, settings = _matching(args)
    reference = _reference(args)
    check = functools.partial(check_save_target, args.output_dir, args.overwrite, "set of permutations", CLI_WORDING)
    check()                           # before any data is read, and again under the job's lock
    data = _data(args)
    with _job(args, check) as (out, _):
        merger = _merger(args, data)
        perms = merger.align(matcher=matcher, checkpoint=args.align_checkpoint, **reference, **settings)
        merger.save_permutations(out)
    for i, p in enumerate(perms[1:], start=1):
        for group, sims in p.info.get("groups", {}).items():
            print(f"net {i} {group}: similarity identity {sims['similarity_identity']:.2f} -> "
                  f"matched {sims['similarity_matched']:.2f}")
    print(f"permutations: {args.output_dir} ({merger.alignment['align_s']:.1f} s)")
    return 0


def _check_merge_options(args) -> None:
    """Matching options that this merge would silently ignore are an error: --vanilla aligns nothing, and
    --permutations replaces the alignment."""
    if not (args.vanilla or args.permutations):
        return
    data = () if args.repair else ("dataset", "dataset_split", "data_dir")      # REPAIR reads data even then
    given = [f"--{k.replace('_', '-')}" for k in (*_alignment_flag_fields(), *data) if getattr(args, k) is not None]
    if given:
        mode, why = (("--vanilla", "a vanilla average aligns nothing") if args.vanilla else
                     ("--permutations", "the permutations are loaded, not found"))
        raise ValueError(f"{', '.join(given)} cannot be used with {mode}: {why}, so the matching options would be "
                         f"ignored; drop {', '.join(given)} or {mode}")


def cmd_merge(args) -> int:
    from .io_utils import CLI_WORDING
    from .merging.merger import check_save_target

    _check_merge_options(args)
    matcher, settings = _matching(args)
    reference = _reference(args)
    check = functools.partial(check_save_target, args.output_dir, args.overwrite, wording=CLI_WORDING)
    check()                           # before any data is read, and again under the job's lock
    data = _data(args)
    with _job(args, check) as (out, overwrite):
        merger = _merger(args, data)
        merger.check_repair(args.repair)
        if args.permutations:
            merger.load_permutations(args.permutations)
        elif not args.vanilla:
            merger.align(matcher=matcher, checkpoint=args.align_checkpoint, **reference, **settings)
        if args.all:
            model = merger.merge_all(args.checkpoint, permute=not args.vanilla, repair=args.repair)
        else:
            alpha = 0.5 if args.alpha is None else args.alpha
            model = merger.merge(alpha, args.checkpoint, permute=not args.vanilla, repair=args.repair)
        merger.save_pretrained(out, model, command=_command_line(args), overwrite=overwrite)
    print(f"merged model: {args.output_dir}")
    return 0


def cmd_train(args) -> int:
    from .config import load_config
    from .io_utils import check_output_dir
    from .training import PairTrainer
    from .training.trainer import PAIR_CONTENTS

    config = load_config(args.config, args.overrides)
    check = functools.partial(check_output_dir, args.output_dir, args.overwrite, args.resume, marker="run_config.json",
                              resumable=True, what="a pair", contents=PAIR_CONTENTS)
    with _job(args, check, keep=_keep_pair(args)) as (out, overwrite):
        result = PairTrainer(config, out, overwrite=overwrite, resume=args.resume, progress=not args.quiet).train()
    for m in result.metrics:
        print(f"net {m['net']}: test loss {m['test']['loss']:.4f}, test acc {m['test']['acc']:.4f}")
    print(f"pair folder: {args.output_dir} ({result.train_s:.1f} s)")
    return 0


def cmd_evaluate(args) -> int:
    from .config import load_config
    from .reporting.pipeline import check_evaluate_output, check_evaluate_overrides, evaluate_pair

    config = load_config(args.config) if args.config else None
    check_evaluate_overrides(args.overrides)
    check = functools.partial(check_evaluate_output, args.output_dir, args.overwrite)
    with _job(args, check, into=True) as (out, overwrite):     # into: a run folder keeps its pair
        evaluate_pair(args.pair[0] if len(args.pair) == 1 else args.pair, out, config, overrides=args.overrides,
                      overwrite=overwrite, progress=not args.quiet, device=args.device,
                      command=_command_line(args), token=args.token, revision=args.revision)
    print(f"report: {args.output_dir}/report.json")
    return 0


def cmd_run(args) -> int:
    from pathlib import Path

    from .config import load_config
    from .io_utils import check_output_dir
    from .merging.sources import portable_path
    from .reporting.pipeline import RUN_CONTENTS, RUN_MARKER, run

    config = load_config(args.config, args.overrides)
    check = functools.partial(check_output_dir, args.output_dir, args.overwrite, args.resume, marker=RUN_MARKER,
                              resumable=True, what="a run", contents=RUN_CONTENTS)
    with _job(args, check, keep=_keep_run(args)) as (out, overwrite):
        run(config, out, overwrite=overwrite, resume=args.resume, progress=not args.quiet,
            command=_command_line(args), pair_label=portable_path(Path(args.output_dir) / "pair"))
    print(f"report: {args.output_dir}/report.json; merged model: {args.output_dir}/merged")
    return 0


def cmd_push(args) -> int:
    from .hub import push_folder_to_hub

    info = push_folder_to_hub(args.folder, args.repo_id, token=args.token, private=args.private,
                              revision=args.revision, commit_message=args.commit_message, create_pr=args.create_pr)
    print(f"pushed: {getattr(info, 'pr_url', None) or info}")
    return 0


def cmd_sweep(args) -> int:
    from pathlib import Path

    from .io_utils import check_output_dir
    from .sweeps import load_sweep_config, run_sweep
    from .sweeps.runner import SWEEP_CONTENTS

    config = load_sweep_config(args.config, args.overrides)
    target = Path(args.output_dir)
    continued = (target / "sweep.json").is_file() and not args.overwrite
    check = functools.partial(check_output_dir, target, args.overwrite, resume=continued, marker="sweep.json",
                              what="a sweep", contents=SWEEP_CONTENTS)

    def keep(folder):
        if continued or any(folder.glob("cells/*/result.json")):
            return f"kept the finished cells in {folder}: the same command continues the sweep"
        return None

    with _job(args, check, keep=keep) as (out, overwrite):
        result = run_sweep(config, out, overwrite=overwrite, progress=not args.quiet, command=_command_line(args))
    if not result.is_main_process:
        return 0
    print(result.summary)
    print(f"{len(config.cells)} cells ({len(result.ran)} run here, {len(result.skipped)} already done); "
          f"wrote {', '.join(f'{args.output_dir}/{f}' for f in result.files)}")
    if result.failed:
        print(f"hf-permerge sweep: {len(result.failed)} cell(s) failed (run the command again to retry them):",
              file=sys.stderr)
        for cell, error in result.failed.items():
            print(f"  {cell}: {error} (see {args.output_dir}/cells/{cell}/error.txt)", file=sys.stderr)
        return 1
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is: it unwinds like Ctrl-C (temporary folders are removed on the way
    out, the same message), and the command exits 143 as a terminated process does."""


def _exit_on_sigterm(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    previous = signal.getsignal(signal.SIGTERM)
    ours = threading.current_thread() is threading.main_thread() and previous is signal.SIG_DFL
    if ours:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return _run(args)
    finally:
        if ours:
            signal.signal(signal.SIGTERM, previous)


def _run(args) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .allocator import reuse_freed_memory

    reuse_freed_memory()    # a command's large CPU tensors reuse freed memory (allocator.py: 2x on CNN passes)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        return args.func(args)
    except (ValueError, OSError, RuntimeError, MemoryError) as err:
        if args.verbose:                      # -v: the whole traceback, for a bug report
            import traceback

            traceback.print_exc()
        from .hub import cli_message
        from .io_utils import OUTCOME

        outcome = getattr(err, OUTCOME, "")
        print(f"hf-permerge {args.command}: error: {cli_message(err)}" + (f" ({outcome})" if outcome else ""),
              file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        from .io_utils import OUTCOME

        resume = "; --resume continues it from the last epoch end it reached"
        again = {"train": resume, "run": resume,
                 "sweep": "; the same command continues it (finished cells are kept)"}.get(args.command, "")
        how = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
        outcome = getattr(err, OUTCOME, None)        # set by the job: what became of the output folder
        print(f"hf-permerge {args.command}: {how}; " + (outcome or f"nothing half-written was left{again}"),
              file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(err, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
