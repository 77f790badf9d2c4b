"""Run a sweep: each cell trains a pair and measures it; processes share the cells; finished cells are skipped.

    OUT/sweep.json                  the validated sweep (base config, grid, cell list)
    OUT/cells/<cell>/result.json    the cell's config and its numbers (small: no weights, no full curves)
    OUT/cells/<cell>/pair/          its pair folder while it runs (kept only with sweep.keep_pairs)
    OUT/cells/<cell>/error.txt      the traceback of a cell that failed (it is retried on the next run)
    OUT/results.csv, summary.csv, results.json, <name>.png

Under `accelerate launch` with several processes, cell i runs on process i % world size, and each
process trains its cell's nets itself (the nets are not shared further); the main process writes
the table and the figure once every process is done. No scheduler of our own: Accelerate starts the
processes, and a second run of the same command picks up whatever is not finished.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import PartialState

from ..config import ConfigError, config_differences
from ..devices import check_device
from ..io_utils import check_output_dir, folder_job, write_json_atomic
from ..records import PairRecord, read_json, read_record
from ..training import PairTrainer, build_model, train_together
from ..training.splits import load_splits
from ..training.trainer import _without_seed
from . import experiments
from .config import Cell, SweepConfig
from .tables import cell_rows, summarise, summary_text, write_csv

logger = logging.getLogger("hf_permerge.sweeps")

SWEEP_CONTENTS = ("sweep.json", "cells", "results.csv", "results.json", "summary.csv", "*.png")
"""What a sweep folder consists of; --overwrite replaces nothing else."""
BARRIER_TIMEOUT = timedelta(days=7)
"""Processes that finish their cells early wait at a barrier for the others; cells can take hours."""


class OneProcess:
    """What `PairTrainer` asks of an Accelerator, for a cell that one process of a sweep trains whole."""

    num_processes = 1
    process_index = 0
    is_main_process = True

    def __init__(self, device):
        self.device = check_device(device)

    def wait_for_everyone(self) -> None:
        pass


@dataclass
class SweepResult:
    output_dir: Path
    is_main_process: bool
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    """cell id -> the last line of its error (main process: every failed cell of the sweep)."""
    summary: str = ""
    files: list[str] = field(default_factory=list)


def process_state():
    """Accelerate's view of the processes (one, or those of `accelerate launch`); gloo on CPU."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    kwargs = {"timeout": BARRIER_TIMEOUT} if several else {}
    return PartialState(cpu=several and not torch.cuda.is_available(), **kwargs)


def _measure_settings(config: SweepConfig) -> dict:
    s = config.sweep
    return {"experiment": s.experiment, "matchers": s.matchers, "curves": s.curves}


CELL_FORMAT = "hf_permerge.sweep_cell/2"
"""Format 2: CNNs without biases by default, training-split curves on their own sample of images."""


def _as_measured(result: dict) -> dict | None:
    """A finished cell's config with the defaults of the version that measured it spelled out, so a cell of
    an older version is not taken for one of today's: a format-1 CNN with `bias: null` had biases, and its
    training-split curves used the matchers' own images (an `evaluation.splits` with train then differs)."""
    saved = result.get("config")
    if saved is None or result.get("format") != "hf_permerge.sweep_cell/1":
        return saved
    saved = json.loads(json.dumps(saved))
    if saved.get("model", {}).get("type") == "cnn" and saved["model"].get("bias") is None:
        saved["model"]["bias"] = True
    if "train" in saved.get("evaluation", {}).get("splits", []):
        saved["evaluation"]["splits"] = [
            s if s != "train" else "train (the matchers' sample)" for s in saved["evaluation"]["splits"]
        ]
    return saved


def check_finished_cells(config: SweepConfig, output_dir: Path) -> None:
    """Refuse to mix results of a different config into this sweep, before any work."""
    for cell in config.cells:
        folder = output_dir / "cells" / cell.id
        result, run_config = folder / "result.json", folder / "pair" / "run_config.json"
        saved = None
        if result.is_file():
            data = read_json(result, "delete that cell's folder to measure it again")
            saved = _as_measured(data)
            if data.get("measure") != _measure_settings(config):
                raise ConfigError(
                    f"{result} was measured with {data.get('measure')}, not {_measure_settings(config)}; "
                    "use another --output-dir, or --overwrite to start the sweep again"
                )
        elif run_config.is_file():
            saved = read_json(run_config, "delete that cell's folder to train it again")
        diff = config_differences(saved, cell.config) if saved is not None else []
        if diff:
            raise ConfigError(
                f"cell {cell.id} in {output_dir} was made with a different config (differs in "
                f"{', '.join(diff)}); use another --output-dir, or --overwrite to start the sweep again"
            )


def check_data(config: SweepConfig) -> None:
    """Every data set the cells use must load (on the CPU, cached for the cells) before anything is written."""
    seen = {}
    for cell in config.cells:
        seen.setdefault(json.dumps(cell.config.data.model_dump(mode="json"), sort_keys=True), cell.config)
    for run_config in seen.values():
        load_splits(run_config, "cpu")


STACK_MAX_PARAMS = 200_000_000
"""Parameters of all nets in one training stack on the CPU (with gradients and AdamW's two moments: 3.2 GB in
float32); on a GPU, a 64th of its memory in parameters (16 bytes each: a quarter of the memory in all)."""


def stack_max_params(device) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 64
    return STACK_MAX_PARAMS


def _parameter_count(config) -> int:
    """Parameters of one net of `config`: the model built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(config, 0).parameters())


def seed_stacks(cells: list[Cell], output_dir: Path, max_params: int = STACK_MAX_PARAMS) -> list[list[Cell]]:
    """Groups of untrained cells (no result, no pair folder yet) that differ only in `training.seed`,
    each group's nets within `max_params`; single cells are left to `run_cell`."""
    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        folder = output_dir / "cells" / cell.id
        if (folder / "result.json").is_file() or (folder / "pair").exists():
            continue
        groups.setdefault(json.dumps(_without_seed(cell.config), sort_keys=True), []).append(cell)
    stacks = []
    for group in groups.values():
        per_pair = _parameter_count(group[0].config) * group[0].config.training.num_nets
        size = max(1, max_params // max(per_pair, 1))
        stacks += [group[i : i + size] for i in range(0, len(group), size) if len(group[i : i + size]) > 1]
    return stacks


def measure_workers(setting: int | str, stack: list[Cell], device) -> int:
    """Cells of `stack` to measure at once ("auto": see `SweepSection.measure_workers`)."""
    if setting != "auto":
        return max(1, min(int(setting), len(stack)))
    device = torch.device(device)
    if device.type != "cuda":
        return 1
    # estimated, not measured: a cell holds about 24 copies of one net at its peak (its nets, their
    # permuted copies, an 11-lambda stack)
    per_cell = _parameter_count(stack[0].config) * 4 * 24
    budget = torch.cuda.get_device_properties(device).total_memory // 2
    return max(1, min(len(stack), 8, budget // max(per_cell, 1)))


def train_stack(stack: list[Cell], output_dir: Path, device, progress: bool) -> None:
    """Train a stack's pairs together; on any error leave them to `run_cell` (which resumes or retrains)."""
    try:
        train_together(
            [
                PairTrainer(
                    cell.config,
                    output_dir / "cells" / cell.id / "pair",
                    resume=True,
                    accelerator=OneProcess(device),
                    progress=progress,
                )
                for cell in stack
            ]
        )
    except Exception:
        logger.warning(
            "training cells %s together failed; training them one by one:\n%s",
            [c.id for c in stack],
            traceback.format_exc(),
        )


def run_cell(cell: Cell, config: SweepConfig, output_dir: Path, device, progress: bool = False) -> str:
    """Train and measure one cell; returns "done", "skipped" (a result exists) or "failed" (error.txt written)."""
    folder = output_dir / "cells" / cell.id
    if (folder / "result.json").is_file():
        return "skipped"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "error.txt").unlink(missing_ok=True)
    pair_dir = folder / "pair"
    start = time.perf_counter()
    try:
        if (pair_dir / "pair.json").is_file():  # trained in a stack, or on a run that stopped while measuring
            train_timings = read_record(pair_dir / "pair.json", PairRecord).get("timings", {})
        else:
            train_timings = {
                "train_s": PairTrainer(
                    cell.config, pair_dir, resume=True, accelerator=OneProcess(device), progress=progress
                )
                .train()
                .train_s
            }
        measured = experiments.measure(
            config.sweep.experiment,
            cell.config,
            pair_dir,
            device,
            matchers=config.sweep.matchers,
            curves=config.sweep.curves,
            progress=progress,
        )
    except Exception:  # one cell's failure (a diverged net, a full disk) must not stop the other cells
        (folder / "error.txt").write_text(traceback.format_exc())
        logger.warning("cell %s failed; see %s", cell.id, folder / "error.txt")
        return "failed"
    result = {
        "format": CELL_FORMAT,
        "cell": cell.id,
        "values": cell.values,
        "measure": _measure_settings(config),
        "config": cell.config.to_dict(),
        "metrics": measured["metrics"],
        **({"curves": measured["curves"]} if "curves" in measured else {}),
        "timings": {**train_timings, **measured["timings"], "cell_s": time.perf_counter() - start},
        "device": str(device),
    }
    write_json_atomic(folder / "result.json", result)
    if not config.sweep.keep_pairs:
        shutil.rmtree(pair_dir, ignore_errors=True)
    return "done"


def write_outputs(config: SweepConfig, output_dir: Path, command: str | None = None) -> tuple[list[str], str, dict]:
    """results.csv (a row per cell), summary.csv (mean and Student-t 95% half-width over seeds), results.json and
    the figure(s)."""
    from .figures import write_figures  # keep lazy: matplotlib costs ~1 s at import, paid only when plotting

    rows = cell_rows(config, output_dir)
    summary = summarise(config, rows)
    before = output_dir / "results.json"
    old_figures = read_json(before, "delete it (it is written again)").get("figures", []) if before.is_file() else []
    figures = write_figures(config, summary, output_dir) if summary else []
    for name in set(old_figures) - set(figures):  # a renamed sweep: its old figure would describe nothing
        if Path(name).name == name and name.endswith(".png"):
            (output_dir / name).unlink(missing_ok=True)
    write_csv(output_dir / "results.csv", rows)
    write_csv(output_dir / "summary.csv", summary)
    cell_s = [r["cell_s"] for r in rows if "cell_s" in r]
    write_json_atomic(
        output_dir / "results.json",
        {
            "format": "hf_permerge.sweep/1",
            "sweep": config.sweep.model_dump(mode="json"),
            "command": command,
            "cells": rows,
            "summary": summary,
            "figures": figures,
            "timings": {"cells_done": len(cell_s), "cell_s_total": sum(cell_s)},
        },
    )
    failed = {r["cell"]: r["error"] for r in rows if r["status"] == "failed"}
    return ["results.csv", "summary.csv", "results.json"] + figures, summary_text(config, summary), failed


def check_sweep_output(output_dir, overwrite: bool = False) -> None:
    """A sweep folder's rule (`io_utils.check_output_dir`), checked before any work by `run_sweep` and the CLI:
    a folder of ours is continued unless `overwrite`."""
    output_dir = Path(output_dir)
    continued = (output_dir / "sweep.json").is_file() and not overwrite
    check_output_dir(
        output_dir, overwrite, resume=continued, marker="sweep.json", what="a sweep", contents=SWEEP_CONTENTS
    )


def keep_sweep(continued: bool, again: str = "the same run_sweep call"):
    """What a failed sweep keeps (`io_utils.output_job`'s `keep`): its finished cells, which `again` continues."""

    def keep(folder):
        if continued or any(folder.glob("cells/*/result.json")):
            return f"kept the finished cells in {folder}: {again} continues the sweep"
        return None

    return keep


def run_sweep(
    config: SweepConfig, output_dir, overwrite: bool = False, progress: bool = True, command: str | None = None
) -> SweepResult:
    """Run (or continue) a sweep in `output_dir`, as one job (`io_utils.folder_job`): a sweep that `overwrite`
    replaces stays as it was unless the new one finishes. Every process of `accelerate launch` calls this."""
    state = process_state()
    output_dir = Path(output_dir)
    continued = (output_dir / "sweep.json").is_file() and not overwrite
    check = functools.partial(check_sweep_output, output_dir, overwrite)
    check()
    if continued:
        check_finished_cells(config, output_dir)
    check_data(config)
    with folder_job(output_dir, check, overwrite, keep=keep_sweep(continued)) as (out, overwrite):
        result = _run_cells(config, out, overwrite, state, progress, command)
    result.output_dir = output_dir
    return result


def _run_cells(config: SweepConfig, output_dir: Path, overwrite: bool, state, progress: bool, command) -> SweepResult:
    """The sweep's job in `output_dir`: sweep.json, then this process's cells, then (main process) the tables."""
    state.wait_for_everyone()
    if state.is_main_process:
        if overwrite and output_dir.exists():  # several processes: see folder_job
            shutil.rmtree(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(output_dir / "sweep.json", {**config.to_dict(), "source": config.source, "command": command})
    state.wait_for_everyone()

    result = SweepResult(output_dir, state.is_main_process)
    mine = [c for i, c in enumerate(config.cells) if i % state.num_processes == state.process_index]
    tag = f"[process {state.process_index}] " if state.num_processes > 1 else ""
    stacks = {
        cell.id: stack
        for stack in (seed_stacks(mine, output_dir, stack_max_params(state.device)) if config.sweep.stack_seeds else [])
        for cell in stack
    }
    number = {cell.id: n for n, cell in enumerate(mine, start=1)}

    def measure_one(cell: Cell) -> None:
        start = time.perf_counter()
        status = run_cell(cell, config, output_dir, state.device, progress)
        {"done": result.ran, "skipped": result.skipped}.get(status, []).append(cell.id)
        if status == "failed":
            result.failed[cell.id] = "see error.txt"
        if progress or status != "skipped":
            print(
                f"{tag}cell {number[cell.id]}/{len(mine)} {cell.id}: {status} ({time.perf_counter() - start:.1f} s)",
                flush=True,
            )

    measured = set()
    for cell in mine:
        if cell.id in measured:
            continue
        stack = stacks.get(cell.id, [cell])
        if len(stack) > 1 and not (output_dir / "cells" / cell.id / "pair").exists():
            start = time.perf_counter()
            train_stack(stack, output_dir, state.device, progress)
            print(f"{tag}trained {len(stack)} cells together ({time.perf_counter() - start:.1f} s)", flush=True)
        workers = measure_workers(config.sweep.measure_workers, stack, state.device)
        if workers == 1:
            for c in stack:
                measure_one(c)
        else:  # one cell's Hungarian solves (CPU, GIL released) overlap the others' device work
            with ThreadPoolExecutor(workers, thread_name_prefix="measure") as pool:
                list(pool.map(measure_one, stack))
        measured.update(c.id for c in stack)
    state.wait_for_everyone()
    if state.is_main_process:
        result.files, result.summary, result.failed = write_outputs(config, output_dir, command)
    return result
