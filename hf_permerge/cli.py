"""The `hf-permerge` command line: config files plus `--set section.key=value` overrides.

Heavy imports (torch, transformers, evaluate) happen inside the subcommands, so `--help` stays quick
and `evaluate` is never imported on start-up.
"""
from __future__ import annotations

import argparse
import logging
import sys

EPILOG = "Docs: README.md. Configs: configs/*.yaml. Every subcommand has --help."


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config with sections model, data, training, alignment, evaluation "
                                  "(see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set training.epochs=1 (repeatable; values parsed as YAML)")


def _add_output_args(p: argparse.ArgumentParser, resumable: bool = False) -> None:
    p.add_argument("--output-dir", "-o", required=True, help="folder to write; refused if it exists and is not empty")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder of ours")
    if resumable:
        p.add_argument("--resume", action="store_true", help="continue an interrupted run in --output-dir")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-permerge",
        description="Permutation-aware model merging for Hugging Face models: train seeded pairs, align their "
                    "hidden units, merge trained weights and untrained inits, measure loss barriers, share on the Hub.",
        epilog=EPILOG)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="train N seeded nets (a pair by default) and write a pair folder",
                       description="Train `training.num_nets` nets that differ only in seed (init and data order). "
                                   "Writes OUT/net_i/{init,step-N,final}/ (HF model folders) and OUT/pair.json. "
                                   "Use `accelerate launch examples/train_pair.py` to share the nets among processes.",
                       epilog=EPILOG)
    _add_config_args(p)
    _add_output_args(p, resumable=True)
    p.set_defaults(func=cmd_train)
    return parser


def cmd_train(args) -> int:
    from .config import load_config
    from .training import PairTrainer

    config = load_config(args.config, args.overrides)
    result = PairTrainer(config, args.output_dir, overwrite=args.overwrite, resume=args.resume,
                         progress=not args.quiet).train()
    for m in result.metrics:
        print(f"net {m['net']}: test loss {m['test']['loss']:.4f}, test acc {m['test']['acc']:.4f}")
    print(f"pair folder: {result.output_dir} ({result.train_s:.1f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        return args.func(args)
    except (ValueError, OSError, RuntimeError) as err:
        print(f"hf-permerge {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
