"""The subcommands: each reads its arguments (`options`), runs its job on its output folder (`jobs`) and prints
one line per result. Heavy imports happen here, inside the command that needs them."""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

from ..io_utils import check_outside_inputs
from .jobs import job
from .options import (
    check_merge_options,
    check_streamed_options,
    command_line,
    data_source,
    device,
    heldout_text,
    matching,
    merger_for,
    reference_args,
)


def cmd_align(args) -> int:
    from ..io_utils import CLI_WORDING
    from ..merging.merger import check_save_target

    on = device(args)
    matcher, settings = matching(args)
    reference = reference_args(args)
    if args.output_dir is None and args.write_aligned is None:
        raise ValueError("say where to write: --output-dir for the permutations, --write-aligned for aligned models")
    perms_out, aligned_out = args.output_dir, args.write_aligned
    for out in (perms_out, aligned_out):
        if out is not None:
            check_outside_inputs(out, args.pair, args.overwrite)
    aligned = functools.partial(check_save_target, aligned_out, args.overwrite, "aligned model", CLI_WORDING)
    if aligned_out is not None:
        aligned()
    check = (
        functools.partial(check_save_target, perms_out, args.overwrite, "set of permutations", CLI_WORDING)
        if perms_out is not None
        else aligned
    )
    check()  # before any data is read, and again under the job's lock, taken before any work
    args.output_dir = perms_out or aligned_out  # the job's folder
    with job(args, check) as (out, overwrite):
        merger = merger_for(args, data_source(args), on)
        perms = merger.align(matcher=matcher, checkpoint=args.align_checkpoint, **reference, **settings)
        if perms_out is not None:
            merger.save_permutations(out)
        if aligned_out is not None:  # inside the job when it is the job's folder, else a job of its own
            base = Path(out) if perms_out is None else Path(aligned_out)
            for i in range(1, merger.num_nets):
                target = base if merger.num_nets == 2 else base / f"net_{i}"
                merger.save_aligned(i, target, overwrite=overwrite if perms_out is None else args.overwrite)
    for i, p in enumerate(perms[1:], start=1):
        for group, sims in p.info.get("groups", {}).items():
            print(
                f"net {i} {group}: similarity identity {sims['similarity_identity']:.2f} -> "
                f"matched {sims['similarity_matched']:.2f}"
            )
    if perms_out is not None:
        print(f"permutations: {perms_out} ({merger.alignment['align_s']:.1f} s)")
    if aligned_out is not None:
        print(f"aligned models: {aligned_out}")
    return 0


def cmd_merge(args) -> int:
    from ..io_utils import CLI_WORDING
    from ..merging.merger import check_save_target

    on = device(args)
    check_merge_options(args)
    check_outside_inputs(args.output_dir, args.pair, args.overwrite)
    if args.streamed:
        return merge_streamed_cli(args)
    matcher, settings = matching(args)
    reference = reference_args(args)
    check = functools.partial(check_save_target, args.output_dir, args.overwrite, wording=CLI_WORDING)
    check()  # before any data is read, and again under the job's lock, taken before any work
    with job(args, check) as (out, overwrite):
        merger = merger_for(args, data_source(args), on)
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
        merger.save_pretrained(out, model, command=command_line(args), overwrite=overwrite)
    print(f"merged model: {args.output_dir}")
    return 0


def merge_streamed_cli(args) -> int:
    """merge --streamed: two checkpoint folders, read and written tensor by tensor; weight matching, or activation
    matching on a text --dataset with both models read layer by layer."""
    from ..io_utils import CLI_WORDING
    from ..merging.merger import check_save_target
    from ..merging.streamed import merge_streamed

    check_streamed_options(args)
    matcher, settings = matching(args)
    check = functools.partial(check_save_target, args.output_dir, args.overwrite, wording=CLI_WORDING)
    check()  # before any data is read, and again under the job's lock, taken before any work
    with job(args, check) as (out, overwrite):
        options = {}
        if matcher == "weight":
            options = {k: v for k, v in settings.items() if k in ("max_iter", "seed", "bottom_up")}
        else:
            from ..merging.offloaded import checkpoint_tokens

            source = data_source(args)
            data = checkpoint_tokens(
                args.pair[0],
                source["dataset"],
                args.text_column,
                settings.get("num_examples", 10000),
                settings.get("seed", 0),
            )
            stats = settings.pop("max_statistics_mb", None)
            options = {
                "matcher": "activation",
                "data": data,
                "activation_settings": {k: v for k, v in settings.items() if k not in ("num_examples", "seed")},
                **({"max_statistics_mb": stats} if stats is not None else {}),
            }
        merge_streamed(
            args.pair[0],
            args.pair[1],
            out,
            0.5 if args.alpha is None else args.alpha,
            max_shard_size=args.max_shard_size,
            overwrite=overwrite,
            allow_different_tokenizers=args.allow_different_tokenizers,
            progress=not args.quiet,
            log=print if not args.quiet else (lambda _: None),
            **options,
        )
    print(f"merged model: {args.output_dir}")
    return 0


def cmd_train(args) -> int:
    from ..config import load_config
    from ..io_utils import CLI_WORDING
    from ..training import PairTrainer
    from ..training.trainer import check_pair_output, keep_pair

    config = load_config(args.config, args.overrides)
    check = functools.partial(check_pair_output, args.output_dir, args.overwrite, args.resume)
    with job(args, check, keep=keep_pair(args.resume, CLI_WORDING)) as (out, overwrite):
        result = PairTrainer(config, out, overwrite=overwrite, resume=args.resume, progress=not args.quiet).train()
    for m in result.metrics:
        loss, acc = m["test"]["loss"], m["test"]["acc"]
        if config.data.is_text:
            print(
                f"net {m['net']}: held-out loss {loss:.4f} (perplexity {math.exp(loss):.1f}), next-token acc {acc:.4f}"
            )
        else:
            print(f"net {m['net']}: test loss {loss:.4f}, test acc {acc:.4f}")
    print(f"pair folder: {args.output_dir} ({result.train_s:.1f} s)")
    return 0


def cmd_evaluate(args) -> int:
    from ..config import load_config
    from ..reporting.pipeline import check_evaluate_output, check_evaluate_overrides, evaluate_pair

    on = device(args)
    config = load_config(args.config) if args.config else None
    check_evaluate_overrides(args.overrides)
    check_outside_inputs(args.output_dir, args.pair)  # a run folder holding its pair is the one legal overlap
    check = functools.partial(check_evaluate_output, args.output_dir, args.overwrite)
    check()  # before the held-out text is read
    heldout = heldout_text(args)
    with job(args, check, into=True) as (out, overwrite):  # into: a run folder keeps its pair
        evaluate_pair(
            args.pair[0] if len(args.pair) == 1 else args.pair,
            out,
            config,
            overrides=args.overrides,
            overwrite=overwrite,
            progress=not args.quiet,
            device=on,
            command=command_line(args),
            token=args.token,
            revision=args.revision,
            heldout=heldout,
            allow_different_tokenizers=args.allow_different_tokenizers,
        )
    print(f"report: {args.output_dir}/report.json")
    return 0


def cmd_run(args) -> int:
    from pathlib import Path

    from ..config import load_config
    from ..io_utils import CLI_WORDING
    from ..merging.sources import portable_path
    from ..reporting.pipeline import check_run_output, keep_run, run

    config = load_config(args.config, args.overrides)
    check = functools.partial(check_run_output, args.output_dir, args.overwrite, args.resume)
    with job(args, check, keep=keep_run(args.resume, CLI_WORDING)) as (out, overwrite):
        run(
            config,
            out,
            overwrite=overwrite,
            resume=args.resume,
            progress=not args.quiet,
            command=command_line(args),
            pair_label=portable_path(Path(args.output_dir) / "pair"),
        )
    print(f"report: {args.output_dir}/report.json; merged model: {args.output_dir}/merged")
    return 0


def cmd_push(args) -> int:
    from ..hub import push_folder_to_hub

    info = push_folder_to_hub(
        args.folder,
        args.repo_id,
        token=args.token,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        create_pr=args.create_pr,
    )
    print(f"pushed: {getattr(info, 'pr_url', None) or info}")
    return 0


def cmd_sweep(args) -> int:
    from pathlib import Path

    from ..sweeps import load_sweep_config, run_sweep
    from ..sweeps.runner import check_sweep_output, keep_sweep

    config = load_sweep_config(args.config, args.overrides)
    target = Path(args.output_dir)
    continued = (target / "sweep.json").is_file() and not args.overwrite
    check = functools.partial(check_sweep_output, target, args.overwrite)
    with job(args, check, keep=keep_sweep(continued, "the same command")) as (out, overwrite):
        result = run_sweep(config, out, overwrite=overwrite, progress=not args.quiet, command=command_line(args))
    if not result.is_main_process:
        return 0
    print(result.summary)
    print(
        f"{len(config.cells)} cells ({len(result.ran)} run here, {len(result.skipped)} already done); "
        f"wrote {', '.join(f'{args.output_dir}/{f}' for f in result.files)}"
    )
    if result.failed:
        print(
            f"hf-permerge sweep: {len(result.failed)} cell(s) failed (run the command again to retry them):",
            file=sys.stderr,
        )
        for cell, error in result.failed.items():
            print(f"  {cell}: {error} (see {args.output_dir}/cells/{cell}/error.txt)", file=sys.stderr)
        return 1
    return 0


COMMANDS = {
    "train": cmd_train,
    "align": cmd_align,
    "merge": cmd_merge,
    "evaluate": cmd_evaluate,
    "run": cmd_run,
    "push": cmd_push,
    "sweep": cmd_sweep,
}
"""The function of each subcommand of `parser.build_parser`."""
