"""The main job: train a pair, align it, evaluate it, write report.json, plots and the merged model."""

from __future__ import annotations

import functools
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from ..config import ConfigError, RunConfig, apply_overrides, config_from_dict
from ..data.tensors import load_tensors
from ..devices import check_device
from ..io_utils import PYTHON_WORDING, Wording, check_output_dir, folder_job, remove_path, write_json_atomic
from ..merging import PermMerger
from ..merging.model_card import portable_command
from ..merging.saving import check_save_target
from ..merging.sources import portable_path
from ..training import PairTrainer
from ..training.trainer import resumable_pair
from .report import build_report, summary_table
from .text_report import (
    align_text,
    alignment_arguments,
    check_text_evaluation,
    plot_text_curves,
    text_evaluation_fields,
    text_report,
    text_splits,
    text_summary,
)

logger = logging.getLogger("hf_permerge.pipeline")

RUN_MARKER = "pair/run_config.json"
"""The file that marks a folder as the output of `run` (written first): only such a folder is deleted by
`run --overwrite`."""
EVALUATE_MARKERS = ("report.json", "merged/merge_config.json")
RUN_CONTENTS = ("pair", "report.json", "*.png", "merged", "permutations")
"""What `run` writes: its pair folder and what `evaluate` writes; --overwrite replaces nothing else."""
"""What marks an output of `evaluate`, which `--overwrite` writes into (replacing only its own files, never
deleting the folder)."""
EVALUATE_KEYS = ("alignment.", "evaluation.", "data.data_dir")
"""What `evaluate` may change: how a trained pair is aligned and measured, and where its data set lives here."""


TRAIN_SUBSET_SEED = 1
"""The training images the curves use are an independent draw from the matchers' (seed 0), so a training-split
barrier is not measured on the very sample the permutation was fitted to (the authors' code, too, evaluates on
other batches than it matches on)."""


def evaluation_splits(config: RunConfig, device, mean_std: tuple | None = None) -> dict:
    """The test split and the fixed training subset the report evaluates on (whole, on the device), normalised
    as `mean_std` (the models' recorded normalisation) or else as `config.data` says."""
    splits = {}
    for name in config.evaluation.splits:
        split = load_tensors(
            config.data.dataset, name, device, config.data.data_dir, mean_std or config.data.mean_std()
        )
        splits[name] = (
            split.subset(config.evaluation.train_subset, seed=TRAIN_SUBSET_SEED) if name == "train" else split
        )
    return splits


def align_merger(merger, config: RunConfig) -> None:
    """Align with the config's `alignment` section (the chosen matcher's settings), on the training split."""
    merger.align(**alignment_arguments(config))


def check_evaluate_overrides(overrides: list[str] | None) -> None:
    """model, training and data describe how the pair was made (its pair.json): an override there would make
    the report's record of it false, so it is an error, before any work."""
    bad = [o for o in overrides or [] if not o.split("=", 1)[0].strip().startswith(EVALUATE_KEYS)]
    if bad:
        raise ConfigError(
            f"evaluate cannot override {', '.join(repr(b) for b in bad)}: model, training and data "
            "come from the pair's pair.json (how its nets were made); only alignment.*, evaluation.* "
            "and data.data_dir can be set. To change the nets, train a new pair (hf-permerge run)"
        )


def evaluation_config(
    pair_config: dict | None, config: RunConfig | None, overrides: list[str] | None, source: str
) -> RunConfig:
    """The pair's own config with the `alignment` and `evaluation` sections (and a `data.data_dir`) of `config`
    (when given), then `overrides` (alignment, evaluation, data.data_dir). Without a pair.json, `config`
    describes the nets."""
    data = json.loads(json.dumps(pair_config)) if pair_config is not None else config.to_dict()
    if config is not None:
        given = config.to_dict()
        data["alignment"], data["evaluation"] = given["alignment"], given["evaluation"]
        if given["data"]["data_dir"] is not None:
            data.setdefault("data", {})["data_dir"] = given["data"]["data_dir"]
    return config_from_dict(apply_overrides(data, overrides), source, overrides)


def check_image_evaluation(config: RunConfig) -> None:
    """`run` measures its curves on images; a language-model config is refused before any work."""
    if config.data.is_text:
        raise ValueError(
            f"data.dataset {config.data.dataset} is text: `run` reports on image classifiers; train the language "
            "models with `hf-permerge train CONFIG -o PAIR`, then `hf-permerge evaluate PAIR` measures them"
        )


def check_run_output(output_dir, overwrite: bool = False, resume: bool = False) -> None:
    """A run folder's rule (`io_utils.check_output_dir`), checked before any work by `run` and the CLI."""
    check_output_dir(
        output_dir, overwrite, resume, marker=RUN_MARKER, resumable=True, what="a run", contents=RUN_CONTENTS
    )


def keep_run(resume: bool, wording: Wording = PYTHON_WORDING):
    """What a failed run keeps (`io_utils.output_job`'s `keep`): everything when resuming, else its pair's resume
    state, if any (the rest is made again when the run is resumed)."""

    def keep(folder):
        if resume:
            return f"kept what was done in {folder}: {wording.resume} continues it"
        if not (resumable_pair(folder / "pair") or (folder / "pair" / "pair.json").exists()):
            return None
        for entry in folder.iterdir():
            if entry.name != "pair":
                remove_path(entry)
        return f"kept the pair's resume state in {folder / 'pair'}: {wording.resume} continues the run"

    return keep


def check_evaluate_output(output_dir, overwrite: bool = False) -> None:
    """`evaluate`'s refusals of its output folder, before any download: one that holds something else than an
    evaluation or a run, or (without overwrite) an evaluation already."""
    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite, marker=(*EVALUATE_MARKERS, RUN_MARKER))
    check_save_target(output_dir / "merged", overwrite)  # replaced at the end: refusals come now
    check_save_target(output_dir / "permutations", True, "set of permutations")


def evaluate_pair(
    pair_dir,
    output_dir,
    config: RunConfig | None = None,
    overrides: list[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    device=None,
    train_s: float | None = None,
    command: str | None = None,
    token: str | None = None,
    revision: str | None = None,
    pair_label: str | None = None,
    heldout: dict | None = None,
    allow_different_tokenizers: bool = False,
) -> dict:
    """Align and evaluate a pair folder (or a pair's Hub repo id, at `revision`, read with `token`) on `device`
        (default: the GPU if there is one; one this machine lacks is refused before any work); write OUT/report.json,
        OUT/*.png, OUT/merged/ (with its card) and OUT/permutations/ as one job (`io_utils.folder_job`): an evaluation
        that `overwrite` replaces stays as it was unless the new one is written whole. `pair_label`: how the report
        names the pair (default: its portable path). Language models: held-out loss and perplexity along lambda instead
    (`text_report`); `heldout` ({"dataset", "text_column", "align"}) is the held-out text of model folders (and the
    text to align on); `allow_different_tokenizers` as `PermMerger.from_pretrained`'s."""
    device = check_device(device)
    check_evaluate_overrides(overrides)
    output_dir = Path(output_dir)
    check = functools.partial(check_evaluate_output, output_dir, overwrite)
    check()  # before any download
    with folder_job(output_dir, check, overwrite, into=True) as (out, overwrite):  # into: a run folder keeps its pair
        merger = PermMerger.from_pretrained(
            pair_dir,
            device=device,
            token=token,
            revision=revision,
            allow_different_tokenizers=allow_different_tokenizers,
        )
        models = not isinstance(pair_dir, (str, Path))  # a list of model folders / repo ids
        pair = [s.label for s in merger.sources] if models else pair_label or portable_path(pair_dir)
        if merger.is_text():
            report = _evaluate_text(merger, config, overrides, heldout, models, pair, command, progress, out, overwrite)
            print(text_summary(report))
            return report
        if heldout is not None:
            raise ValueError("--dataset names held-out text for language models; these models take images: drop it")
        if (merger.pair or {}).get("config") is None and config is None:
            raise ValueError(
                f"{'these models have' if models else f'{pair_dir} has'} no pair.json; pass a config "
                "(--config) that describes their data and the evaluation"
            )
        source = ("--config" if models else f"{pair_dir}/pair.json") + (
            " with the --set overrides" if overrides else ""
        )
        config = evaluation_config((merger.pair or {}).get("config"), config, overrides, source)
        check_image_evaluation(config)
        report = _report(merger, config, device, progress, train_s, pair, command)
        _write_evaluation(merger, report, out, config.evaluation.plots, command, overwrite)
    print(summary_table(report))
    return report


def _evaluate_text(merger, config, overrides, heldout, models: bool, pair, command, progress, out, overwrite) -> dict:
    """`evaluate` for language models: align (a trained pair: as its config says; model folders: weight matching),
    measure `text_report`, write OUT/report.json, OUT/text_curves.png, OUT/merged/ (the midpoint) and
    OUT/permutations/."""
    pair_config = (merger.pair or {}).get("config")
    if pair_config is None:  # model folders: only alignment and evaluation mean anything; weight matching
        base = config.to_dict() if config is not None else RunConfig().to_dict()
        if config is None:
            base["alignment"]["matcher"] = "weight"
        config = config_from_dict(apply_overrides(base, overrides), "--config" if config else "defaults", overrides)
    else:
        config = evaluation_config(pair_config, config, overrides, "pair.json")
    check_text_evaluation(config, heldout, models, overrides)
    splits = text_splits(merger, config, heldout)
    align_text(merger, config, (heldout or {}).get("align"))
    report = text_report(merger, config, splits, pair, portable_command(command), progress)
    evaluation = {k: v for k, v in report["config"]["evaluation"].items() if k in text_evaluation_fields(models)}
    report["config"]["evaluation"] = evaluation  # what was measured, not the image settings it never read
    if pair_config is None:
        report["config"] = {"alignment": report["config"]["alignment"], "evaluation": evaluation}
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".plots-") as tmp:
        files = plot_text_curves(report, Path(tmp)) if config.evaluation.plots else []
        merged = merger.merge(0.5, "final")
        merger.save_pretrained(out / "merged", merged, report=report, command=command, overwrite=overwrite)
        for name in files:
            (Path(tmp) / name).replace(out / name)
    write_json_atomic(out / "report.json", report)
    merger.save_permutations(out / "permutations")
    return report


def _report(merger, config: RunConfig, device, progress: bool, train_s: float | None, pair, command) -> dict:
    """report.json of `merger`'s nets (`pair`), aligned and evaluated as `config` says, on its data."""
    merger.use_data(config.data.dataset, config.data.data_dir)  # align (and tell) on the data evaluated on
    splits = evaluation_splits(config, device, merger.recorded_normalisation())
    align_merger(merger, config)
    report = build_report(merger, config.evaluation, splits, progress=progress)
    report["timings"]["train_s"] = (
        train_s if train_s is not None else (merger.pair or {}).get("timings", {}).get("train_s")
    )
    report["config"] = config.to_dict()
    if merger.pair is None:  # model folders: --config gave the data and evaluation; what they are is their own
        report["config"].update(model=merger.load(0).config.to_dict(), training=None)  # config.json; training unknown
    report["pair"] = pair
    commits = {s.hub_id: s.commit for s in merger.sources if s.commit}
    if commits:
        report["hub_commits"] = commits  # what was read from the Hub, by repo
    report["command"] = portable_command(command)
    return report


def _write_evaluation(merger, report: dict, out: Path, plots: bool, command: str | None, overwrite: bool) -> None:
    """OUT/merged/ (the midpoint, with the report and plots in its card), OUT/*.png, OUT/report.json and
    OUT/permutations/."""
    from .plots import write_plots  # keep lazy: matplotlib costs ~1 s at import, paid only when plotting

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".plots-") as tmp:
        files = [Path(tmp) / name for name in (write_plots(report, Path(tmp)) if plots else [])]
        merged = merger.merge(0.5, "final")
        merger.save_pretrained(out / "merged", merged, report=report, files=files, command=command, overwrite=overwrite)
        for path in files:
            path.replace(out / path.name)
    write_json_atomic(out / "report.json", report)
    merger.save_permutations(out / "permutations")


def run(
    config: RunConfig,
    output_dir,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    command: str | None = None,
    pair_label: str | None = None,
) -> dict:
    """train + align + evaluate in one go: OUT/pair/, OUT/report.json, OUT/*.png, OUT/merged/ (`pair_label`: see
    `evaluate_pair`)."""
    check_image_evaluation(config)
    if config.training.num_nets < 2:
        raise ValueError(
            f"training.num_nets {config.training.num_nets}: a run aligns and merges nets, which needs "
            "at least 2; set training.num_nets to 2 or more (or use `hf-permerge train` for one net)"
        )
    output_dir = Path(output_dir)
    check = functools.partial(check_run_output, output_dir, overwrite, resume)
    with folder_job(output_dir, check, overwrite, resume, keep=keep_run(resume)) as (out, overwrite):
        if overwrite and not resume and out.exists():  # several processes: see folder_job
            shutil.rmtree(out)
        start = time.perf_counter()
        PairTrainer(config, out / "pair", resume=resume, progress=progress, overwrite=overwrite).train()
        train_s = time.perf_counter() - start
        return evaluate_pair(
            out / "pair",
            out,
            config,
            overwrite=True,
            progress=progress,
            train_s=train_s,
            command=command,
            pair_label=pair_label or portable_path(output_dir / "pair"),
        )
