"""The `hf-permerge` argument parser: subcommands, their flags and help.

It imports nothing heavy (no torch, transformers, datasets or evaluate), so `--help`, `--version` and argument
errors answer at once. The matching flags are derived from the config's pydantic models and validated by them.
"""

from __future__ import annotations

import argparse
import functools

EPILOG = "Docs: README.md, docs/GUIDE.md. Configs: configs/*.yaml. Every subcommand has --help."


def _add_set(p: argparse.ArgumentParser, metavar: str, help: str) -> None:
    """The repeatable `--set KEY=VALUE` config override (values parsed as YAML), collected in `args.overrides`."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar=metavar, help=help)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "config", help="YAML config with sections model, data, training, alignment, evaluation (see configs/)"
    )
    _add_set(
        p,
        "SECTION.KEY=VALUE",
        "override a config value, e.g. --set training.epochs=1 (repeatable; values parsed as YAML)",
    )


def _add_output_args(p: argparse.ArgumentParser, resumable: bool = False, required: bool = True) -> None:
    p.add_argument(
        "--output-dir", "-o", required=required, help="folder to write; refused if it exists and is not empty"
    )
    modes = p.add_mutually_exclusive_group()
    modes.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output folder of ours when the new job succeeds (it is written "
        "beside the old one and swapped in; a failure leaves the old one as it was)",
    )
    if resumable:
        modes.add_argument("--resume", action="store_true", help="continue an interrupted run in --output-dir")


def _common_flags(defaults: bool) -> argparse.ArgumentParser:
    """-v / -q, accepted before or after the subcommand (`hf-permerge -q run ...`, `hf-permerge run -q ...`);
    after it they only override when given (SUPPRESS), so a flag before it is not reset."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    default = False if defaults else argparse.SUPPRESS
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default,
        help="log debug messages; on an error, print its traceback",
    )
    p.add_argument("-q", "--quiet", action="store_true", default=default, help="no progress bars")
    return p


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
        super().__init__(
            option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="show the program's version and exit"
        )

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog} {_version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,  # no `--tok` for `--token`: the recorded command leaves out exactly `--token`
        prog="hf-permerge",
        description="Permutation-aware model merging for Hugging Face models: train seeded pairs, align their "
        "hidden units, merge trained weights and untrained inits, measure loss barriers, share on the Hub.",
        epilog=EPILOG,
        parents=[_common_flags(defaults=True)],
    )
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add = functools.partial(sub.add_parser, parents=[_common_flags(defaults=False)], allow_abbrev=False)

    p = add(
        "train",
        help="train N seeded nets (a pair by default) and write a pair folder",
        description="Train `training.num_nets` nets that differ only in seed (init and data order). "
        "Writes OUT/net_i/{init,step-N,final}/ (HF model folders) and OUT/pair.json. "
        "Use `accelerate launch examples/train_pair.py` to share the nets among processes.",
        epilog=EPILOG,
    )
    _add_config_args(p)
    _add_output_args(p, resumable=True)

    p = add(
        "align",
        help="find the permutations that align every net of a pair onto net 0",
        description="Match hidden units of each net to net 0 (activation matching with the Hungarian "
        "algorithm by default) and write OUT/net_i.safetensors + OUT/alignment.json, and/or (--write-aligned) "
        "the other nets permuted onto net 0 as model folders.",
        epilog=EPILOG,
    )
    _add_pair_arg(p)
    _add_output_args(p, required=False)
    p.add_argument(
        "--write-aligned",
        metavar="OUT",
        help="also (or instead of --output-dir) write each other net permuted onto net 0 as an ordinary model "
        "folder (OUT for two models, OUT/net_i for more): the same function, its units lined up with net 0's, "
        "ready for any other merging tool (mergekit: linear, SLERP, TIES)",
    )
    _add_matcher_args(p)

    p = add(
        "merge",
        help="merge a pair: align, then average weights (trained, init or a step)",
        description="Writes OUT as an HF model folder that loads with the Auto class of its kind "
        "(AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForImageClassification; our own image models after "
        "`import hf_permerge`), with its tokenizer or image processor, merge_config.json, a model card and "
        "(unless --vanilla) the permutations.",
        epilog=EPILOG,
    )
    _add_pair_arg(p)
    _add_output_args(p)
    p.add_argument(
        "--checkpoint",
        default=None,
        help="which weights to merge: final, init (the untrained inits) or step-N (default: final, or the "
        "checkpoint whose folders were passed, e.g. a/net_0/step-50 b/net_0/step-50)",
    )
    weights = p.add_mutually_exclusive_group()  # --all weighs every net 1/N: an --alpha would be ignored
    weights.add_argument(
        "--alpha",
        type=_finite_float,
        default=None,
        help="weight of the permuted other net: (1-alpha)*theta_0 + alpha*pi(theta_1) (default 0.5; not with --all)",
    )
    weights.add_argument("--all", action="store_true", help="uniform average of all N aligned nets instead of a pair")
    alignment = p.add_mutually_exclusive_group()  # a vanilla average uses no permutations
    alignment.add_argument(
        "--vanilla", action="store_true", help="average without permuting (the baseline); no alignment is run"
    )
    alignment.add_argument("--permutations", help="use permutations from `hf-permerge align` instead of aligning again")
    p.add_argument(
        "--repair",
        choices=("repair", "reset_bn"),
        default=None,
        help="after averaging: REPAIR (each unit's pre-activation statistics set to the endpoints' "
        "interpolation) or reset_bn (BatchNorm statistics recomputed), on 5000 examples of the data (--dataset); "
        "what a model admits is said before any work (a LayerNorm transformer has no BatchNorm to reset, and "
        "REPAIR needs layers it can fold a correction into)",
    )
    p.add_argument(
        "--streamed",
        action="store_true",
        help="two model folders of any size: weight matching and the merge read tensors from the safetensors "
        "shards as needed and write the merge shard by shard (memory bounded by the largest group, not the "
        "models; the memory and disk needed are printed and checked first)",
    )
    p.add_argument(
        "--max-shard-size", default="5GB", help="with --streamed: the merged shards' size (as save_pretrained's)"
    )
    _add_matcher_args(p)

    p = add(
        "evaluate",
        help="align a pair and write report.json, plots and the merged model",
        description="Aligns the pair (config's `alignment` section, from pair.json unless --config), "
        "evaluates interpolation curves (vanilla and permuted, trained and init), barriers, "
        "n-way averages, and optionally the plane and schedules. Writes OUT/report.json, "
        "OUT/*.png, OUT/permutations/ and OUT/merged/ (model + card).",
        epilog=EPILOG,
    )
    p.add_argument(
        "pair",
        nargs="+",
        help="a pair folder, the Hub repo id of a pair, or >= 2 model folders / repo ids "
        "(then --config names their data)",
    )
    p.add_argument(
        "--config",
        help="config whose alignment and evaluation sections (and data.data_dir) to use; model, "
        "training and data come from the pair's pair.json (default: the pair's own config); "
        "for model folders, the whole config describes them",
    )
    _add_set(
        p, "SECTION.KEY=VALUE", "override alignment.*, evaluation.* or data.data_dir, e.g. --set evaluation.plane=true"
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    t = p.add_argument_group("language models given as model folders (a trained pair brings its own held-out text)")
    t.add_argument(
        "--dataset",
        help="the held-out text the loss curves are measured on: a text file (.txt, .jsonl, .csv), a folder "
        "written by Dataset.save_to_disk or a Hub dataset id",
    )
    t.add_argument(
        "--dataset-split",
        help="the split of a --dataset folder or Hub id (default: a saved DatasetDict's test, else train)",
    )
    t.add_argument("--text-column", help="the column of --dataset holding text (default: input_ids, else 'text')")
    _add_tokenizer_flag(t)
    t.add_argument(
        "--align-dataset",
        help="other text to align on with a data matcher (--set alignment.matcher=activation): a file, folder or "
        "Hub id as --dataset takes (default: weight matching, which reads no text); never the held-out text, "
        "which would flatter the permuted curve",
    )
    _add_output_args(p)
    _add_hub_read_args(p)

    p = add(
        "run",
        help="the main job: train a pair, align, evaluate, report (train + evaluate)",
        description="Train `training.num_nets` nets, align them, evaluate curves and barriers, and write "
        "OUT/pair/, OUT/report.json, OUT/*.png, OUT/permutations/, OUT/merged/.",
        epilog=EPILOG,
    )
    _add_config_args(p)
    _add_output_args(p, resumable=True)

    p = add(
        "push",
        help="upload a merged-model folder or a pair folder to the Hub in one commit",
        description="Uploads FOLDER (a merged model written by merge/evaluate/run, or a pair folder) to "
        "the model repo REPO_ID in one commit, creating it if needed. The token comes from "
        "--token, HF_TOKEN or `hf auth login`, and is never printed.",
        epilog=EPILOG,
    )
    p.add_argument("folder", help="e.g. runs/demo/merged or runs/demo/pair")
    p.add_argument("repo_id", help="namespace/name (the namespace defaults to the token's user)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--revision", help="branch to push to (created if missing)")
    p.add_argument("--commit-message", help="commit message (default: 'Upload ... with hf_permerge')")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    p.add_argument("--token", help="a Hugging Face token (prefer HF_TOKEN or `hf auth login`)")

    p = add(
        "sweep",
        help="run a grid of runs (a paper figure): one table and one figure; resumable",
        description="Run every cell of a sweep config (a base run config plus a `sweep:` section with "
        "name, experiment and grid; see configs/sweeps/). Each cell trains a pair in "
        "OUT/cells/<cell>/ and writes its result.json; cells with a result are skipped, so "
        "running the same command again continues a sweep. Writes OUT/results.csv, "
        "OUT/summary.csv, OUT/results.json and OUT/<name>.png. Under `accelerate launch "
        "-m hf_permerge.cli sweep ...` the processes share the cells (cell i on process "
        "i mod the number of processes).",
        epilog=EPILOG,
    )
    p.add_argument(
        "config",
        help="sweep YAML: sections model, data, training, alignment, evaluation and sweep (see configs/sweeps/)",
    )
    _add_set(
        p,
        "KEY=VALUE",
        "override a base value (training.epochs=1) or a sweep value (sweep.keep_pairs=true, "
        "sweep.grid.model.width=[32,64]); repeatable, values parsed as YAML",
    )
    p.add_argument(
        "--output-dir",
        "-o",
        required=True,
        help="sweep folder; an existing sweep folder is continued (finished cells are skipped)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start the sweep again: replace an existing sweep folder when the new sweep has run",
    )
    return parser


ALIGNMENT_FLAGS = {"align_checkpoint": "checkpoint"}
"""The matching flags whose names differ from their `alignment` field's (the others are the field's name)."""


def alignment_flag_fields() -> dict[str, str]:
    """{argparse dest: alignment field} of every matching flag: each field of the config's `alignment` section."""
    from ..config import AlignmentSection

    renamed = {field: dest for dest, field in ALIGNMENT_FLAGS.items()}
    return {renamed.get(name, name): name for name in AlignmentSection.model_fields}


def _validated_by(section: str, field: str):
    """An argparse `type` for the flag that mirrors config field `section.field`: the value is read as YAML (as
    `--set` reads it) and validated by that field's pydantic model, so a flag refuses exactly what the config
    refuses, in the same words."""

    def parse(raw: str):
        from pydantic import ValidationError

        from ..config import RunConfig, parse_yaml

        model = RunConfig.model_fields[section].annotation
        try:
            value = parse_yaml(raw)
            model.__pydantic_validator__.validate_assignment(model.model_construct(), field, value)
        except ValidationError as err:
            e = err.errors()[0]
            raise argparse.ArgumentTypeError(
                f"{e['msg'].removeprefix('Value error, ')} (got {raw!r}; the config's {section}.{field} refuses it too)"
            ) from None
        except Exception as err:  # YAML that does not parse
            raise argparse.ArgumentTypeError(f"cannot read {raw!r}: {err}") from None
        return value

    parse.__name__ = f"{section}.{field}"  # argparse names the type in some messages
    return parse


def _finite_float(raw: str) -> float:
    value = float(raw)
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number (got {raw!r})")
    return value


def _flag_help(name: str, info) -> str:
    """A matching flag's help: the matchers it applies to, then its field's description."""
    from ..matching import MATCHER_SETTINGS, setting_owners

    if name == "matcher":
        return (
            "; ".join(f"{m}: {model.__doc__.strip().rstrip('.')}" for m, model in MATCHER_SETTINGS.items())
            + f" (default {info.default})"
        )
    owners = setting_owners().get(name)
    text = (info.description or "").strip()
    return f"{', '.join(owners)}: {text}" if owners else text


def _add_pair_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("pair", nargs="+", help="a pair folder, the Hub repo id of a pair, or >= 2 model folders / repo ids")
    _add_tokenizer_flag(p)
    _add_hub_read_args(p)


def _add_tokenizer_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-different-tokenizers",
        action="store_true",
        help="text models: merge even if their tokenizers differ (refused otherwise, naming the first differing "
        "ids); the model card says so",
    )


def _add_hub_read_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Hub (for repo ids)")
    g.add_argument("--revision", help="branch, tag or commit of the repo ids to download (default: main)")
    g.add_argument(
        "--token",
        help="a token that can read private repos (default: HF_TOKEN or `hf auth login`); "
        "never saved, left out of the recorded command",
    )


def _add_matcher_args(p: argparse.ArgumentParser) -> None:
    """One flag per field of the config's `alignment` section (each matcher's settings come from its model in
    `hf_permerge.matching`), validated by that field; each defaults to None ("not given")."""
    from typing import Literal, get_args, get_origin

    from ..config import AlignmentSection

    g = p.add_argument_group("matching (each option applies to the matchers named in its help)")
    for dest, name in alignment_flag_fields().items():
        info = AlignmentSection.model_fields[name]
        flag = f"--{dest.replace('_', '-')}"
        if info.annotation is bool:
            g.add_argument(
                flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=_flag_help(name, info)
            )
        else:
            choices = get_args(info.annotation) if get_origin(info.annotation) is Literal else None
            g.add_argument(
                flag,
                dest=dest,
                type=_validated_by("alignment", name),
                default=None,
                metavar="{" + ",".join(choices) + "}" if choices else None,
                help=_flag_help(name, info),
            )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    d = p.add_argument_group("data (activation and gradient matching, --repair)")
    d.add_argument(
        "--dataset",
        help="the data to align and repair on: a catalog name (fashion_mnist, mnist, cifar10), "
        "a folder written by Dataset.save_to_disk, a folder of images with one "
        "subfolder per class, a text file (.txt, .jsonl, .csv) for text models, or a Hub dataset id (owner/name); "
        "default: the pair's "
        "data set, or fashion_mnist for model folders",
    )
    d.add_argument("--dataset-split", help="the split of a --dataset folder or Hub id to use (default: train)")
    d.add_argument(
        "--text-column",
        help="text models: the column of --dataset holding text, tokenized by the tokenizer saved beside the "
        "first model (default: input_ids if the data set has them, else 'text'; a .txt file's lines are 'text')",
    )
    d.add_argument("--data-dir", help="a folder with a catalog data set's IDX files (default: the system's copy)")
