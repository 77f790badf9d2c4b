"""The main job: train a pair, align it, evaluate it, write report.json, plots and the merged model."""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ..config import RunConfig, config_from_dict
from ..io_utils import check_output_dir, write_json_atomic

logger = logging.getLogger("hf_permerge.pipeline")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def evaluation_splits(config: RunConfig, device) -> dict:
    """The test split and the fixed training subset the report evaluates on (whole, on the device)."""
    from ..data.tensors import load_tensors

    splits = {}
    for name in config.evaluation.splits:
        split = load_tensors(config.data.dataset, name, device, config.data.data_dir)
        splits[name] = split.subset(config.evaluation.train_subset, seed=0) if name == "train" else split
    return splits


def align_merger(merger, config: RunConfig, splits: dict | None = None):
    """Align with the config's `alignment` section, on the training split."""
    a = config.alignment
    settings = {"similarity": a.similarity, "preactivation": a.preactivation, "num_examples": a.num_examples,
                "products": a.products} \
        if a.matcher == "activation" else {"num_examples": a.num_examples, "preconditioner": a.preconditioner,
                                           "damping": a.damping} if a.matcher == "gradient" else {}
    merger.align(matcher=a.matcher, checkpoint=a.checkpoint, **settings)
    return merger


def evaluate_pair(pair_dir, output_dir, config: RunConfig | None = None, overrides: list[str] | None = None,
                  overwrite: bool = False, progress: bool = True, device=None, train_s: float | None = None,
                  command: str | None = None) -> dict:
    """Align and evaluate a pair folder; write OUT/report.json, OUT/*.png and OUT/merged/ (with its card)."""
    from ..config import apply_overrides
    from ..merging import PermMerger
    from .plots import write_plots
    from .report import build_report, summary_table

    device = torch.device(device) if device else default_device()
    merger = PermMerger.from_pretrained(pair_dir, device=device)
    if config is None:
        if merger.pair is None:
            raise ValueError(f"{pair_dir} has no pair.json; pass a config")
        config = config_from_dict(apply_overrides(json.loads(json.dumps(merger.pair["config"])), overrides),
                                  f"{pair_dir}/pair.json")
    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite, marker=("report.json", "pair/run_config.json"))
    splits = evaluation_splits(config, device)
    align_merger(merger, config)
    report = build_report(merger, config.evaluation, splits, progress=progress)
    report["timings"]["train_s"] = train_s if train_s is not None else (merger.pair or {}).get("timings", {}).get("train_s")
    report["config"] = config.to_dict()
    report["pair"] = str(pair_dir)
    report["command"] = command
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".plots-") as tmp:
        plots = [Path(tmp) / name for name in (write_plots(report, Path(tmp)) if config.evaluation.plots else [])]
        merged = merger.merge(0.5, "final")
        merger.save_pretrained(output_dir / "merged", merged, report=report, files=plots, command=command)
        for path in plots:
            path.replace(output_dir / path.name)
    write_json_atomic(output_dir / "report.json", report)
    merger.save_permutations(output_dir / "permutations")
    print(summary_table(report))
    return report


def run(config: RunConfig, output_dir, overwrite: bool = False, resume: bool = False, progress: bool = True,
        command: str | None = None) -> dict:
    """train + align + evaluate in one go: OUT/pair/, OUT/report.json, OUT/*.png, OUT/merged/."""
    from ..training import PairTrainer

    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite, resume, marker=("report.json", "pair/run_config.json"))
    if overwrite and not resume and output_dir.exists():
        shutil.rmtree(output_dir)
    start = time.perf_counter()
    PairTrainer(config, output_dir / "pair", resume=resume, progress=progress,
                overwrite=overwrite).train()
    train_s = time.perf_counter() - start
    return evaluate_pair(output_dir / "pair", output_dir, config, overwrite=True, progress=progress,
                         train_s=train_s, command=command)
