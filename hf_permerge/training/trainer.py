"""PairTrainer: N nets that differ only in seed (init and data order), on Accelerate.

Under `accelerate launch` with several processes the nets are shared out (net i goes to
process i % world_size); each net's result depends only on its own seeds, so any number of
processes gives the same weights.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import RunConfig, config_differences
from ..devices import check_device
from ..io_utils import PYTHON_WORDING, Wording, check_output_dir, folder_job, write_json_atomic
from ..models.folders import load_model, save_model, unique_state
from ..records import read_json
from .builders import build_model
from .checkpoints import load_resume_state, load_rng_state, save_resume_state
from .engines import evaluate_model, make_engine
from .flat_stop import held_out_curve, is_flat, stop_record
from .pair_record import check_steps, pair_record, total_steps
from .schedule import is_scheduled, lr_at
from .seeds import derive_seed, epoch_order
from .splits import load_splits

logger = logging.getLogger("hf_permerge.training")

FINITE_CHECK_S = 1.0
"""How often (seconds) the training loop reads back whether a loss became NaN or inf, as often as the progress bar
refreshes: a diverged net stops within seconds, not at its epoch's end, and a step itself never waits on the
device (the flag is kept there)."""


class TrainingDiverged(RuntimeError):
    """A net's training loss became NaN or inf; nothing of it after the last finite resume point is saved."""


@dataclass
class TrainResult:
    output_dir: Path
    metrics: list[dict]
    train_s: float


@dataclass
class NetSlot:
    """One net to train: where it is saved (its net_i folder), its name in logs, its model and data seed, and
    its evaluations during training (written to net_i/log_history.json with its final checkpoint)."""

    folder: Path
    name: str
    model: torch.nn.Module
    data_seed: int
    random_seed: int
    """What the net's forward draws at random (dropout), step by step (`PerNetEngine`)."""
    log_history: list[dict] = field(default_factory=list)


def _multi_process_without_cuda() -> bool:
    """Several processes and no CUDA: Accelerate must be told to use gloo on the CPU, or each process
    silently runs alone (a launcher config's `use_cpu` does not reach `Accelerator` under --multi_gpu)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


PAIR_CONTENTS = ("run_config.json", "pair.json", "net_*")
"""What a pair folder consists of; --overwrite replaces nothing else (a merge saved inside it is refused)."""


def check_pair_output(output_dir, overwrite: bool = False, resume: bool = False) -> None:
    """A pair folder's rule (`io_utils.check_output_dir`), checked before any work by the trainer and the CLI."""
    check_output_dir(
        output_dir, overwrite, resume, marker="run_config.json", resumable=True, what="a pair", contents=PAIR_CONTENTS
    )


def resumable_pair(pair) -> bool:
    """Whether a pair folder holds what resuming continues from: an epoch's resume point, or finished nets."""
    pair = Path(pair)
    return any(pair.glob("net_*/resume-step-*")) or any(pair.glob("net_*/final"))


def keep_pair(resume: bool, wording: Wording = PYTHON_WORDING):
    """What a failed training keeps (`io_utils.output_job`'s `keep`): everything when resuming, the resume state
    of a new pair when it has one; the rest goes."""

    def keep(folder):
        if resume or resumable_pair(folder):
            return f"kept its resume state in {folder}: {wording.resume} continues it"
        return None

    return keep


class PairTrainer:
    """Train `training.num_nets` nets and write a pair folder (see docs/GUIDE.md: net_i/{init,step-N,final}, pair.json)."""

    def __init__(
        self,
        config: RunConfig,
        output_dir,
        overwrite: bool = False,
        resume: bool = False,
        accelerator=None,
        progress: bool = True,
    ):
        from accelerate import Accelerator

        self.config = config
        self.output_dir = Path(output_dir)
        self.overwrite, self.resume, self.progress = overwrite, resume, progress
        tc = config.training
        self.accelerator = accelerator or Accelerator(log_with=tc.log_with, cpu=_multi_process_without_cuda())
        check_device(self.accelerator.device)
        self.folder, self._replace_there = self.output_dir, overwrite  # while `writing`: where, and whether to replace

    # -- set-up -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def writing(self):
        """The pair folder as one job (`io_utils.folder_job`), as the CLI writes it: one writer at a time, a pair that
        `overwrite` replaces kept until the new one is whole, and a failure leaving only the resume state."""
        check = functools.partial(check_pair_output, self.output_dir, self.overwrite, self.resume)
        keep = keep_pair(self.resume)
        with folder_job(self.output_dir, check, self.overwrite, self.resume, keep=keep) as (folder, overwrite):
            self.folder, self._replace_there = folder, overwrite
            try:
                yield folder
            finally:
                self.folder, self._replace_there = self.output_dir, self.overwrite

    def _prepare_output(self) -> None:
        """The resume checks every process makes before anything is written, then the main process prepares the
        folder (`writing` has checked it)."""
        out, acc = self.folder, self.accelerator
        saved = out / "run_config.json"
        if self.resume and saved.exists():
            # what the nets are made of; alignment and evaluation may change between a run's attempts
            differ = config_differences(
                read_json(saved, "use another --output-dir"), self.config, ("model", "data", "training")
            )
            if differ:
                raise ValueError(
                    f"cannot resume in {out}: its run_config.json differs from this config in "
                    f"{', '.join(differ)}; use the same config, or another --output-dir"
                )
            self._check_saved_nets_match()
        acc.wait_for_everyone()
        if acc.is_main_process:
            if self._replace_there and not self.resume and out.exists():  # several processes: see folder_job
                shutil.rmtree(out)
            out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(saved, self.config.to_dict())
        acc.wait_for_everyone()

    def _check_saved_nets_match(self) -> None:
        """The nets saved by the run being resumed have the tensors this config builds: a default that changed
        between versions (the CNN's biases) would otherwise crash mid-run or train other nets."""
        from safetensors import safe_open

        for i in range(self.config.training.num_nets):
            init = self.folder / f"net_{i}" / "init" / "model.safetensors"
            if not init.is_file():
                continue
            with safe_open(str(init), framework="pt") as f:
                saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            built = {k: tuple(v.shape) for k, v in unique_state(build_model(self.config, i)).items()}
            if saved != built:
                extra, missing = sorted(set(saved) - set(built)), sorted(set(built) - set(saved))
                what = (f"saved only: {extra[:3]}" if extra else "") + ("; " if extra and missing else "") + (
                    f"built only: {missing[:3]}" if missing else ""
                ) or "tensor shapes"
                hint = (
                    " (older versions gave CNNs biases by default: add --set model.bias=true)"
                    if any(k.endswith("bias") for k in extra)
                    else ""
                )
                raise ValueError(
                    f"cannot resume in {self.folder}: net_{i}'s saved weights do not match what this "
                    f"config builds ({what}); the run was made with other model settings or another "
                    f"version's defaults{hint}"
                )

    def my_nets(self) -> list[int]:
        acc = self.accelerator
        return [i for i in range(self.config.training.num_nets) if i % acc.num_processes == acc.process_index]

    # -- training -----------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        cfg, tc, acc = self.config, self.config.training, self.accelerator
        train, test = self._splits()  # data first: a missing data set must fail before any output is written
        check_steps(tc, len(train), "blocks of text" if cfg.data.is_text else "images")
        with self.writing():
            self._prepare_output()
            if tc.log_with:
                acc.init_trackers("hf_permerge", config=cfg.to_dict())
            start = time.perf_counter()
            nets = self._unfinished(self.my_nets())
            if nets:
                self._train_slots(self._slots(nets), train, test)
            acc.wait_for_everyone()
            train_s = time.perf_counter() - start
            metrics = self._write_pair_json(train, test, train_s) if acc.is_main_process else []
            acc.wait_for_everyone()
            if tc.log_with:
                acc.end_training()
        return TrainResult(self.output_dir, metrics, train_s)

    def _slots(self, nets: list[int]) -> list[NetSlot]:
        cfg = self.config
        seed = cfg.training.seed
        return [
            NetSlot(
                self.folder / f"net_{i}",
                f"net {i}",
                build_model(cfg, i),
                derive_seed(seed, i, "data"),
                derive_seed(seed, i, "random"),
            )
            for i in nets
        ]

    def _splits(self):
        """The whole training and test splits, on the device."""
        return load_splits(self.config, self.accelerator.device)

    def _unfinished(self, nets) -> list[int]:
        """The nets among `nets` without a final checkpoint yet (a resumed run skips the others)."""
        return [i for i in nets if not (self.folder / f"net_{i}" / "final").exists()]

    def _train_slots(self, slots: list[NetSlot], train, test) -> None:
        """Train the slots' nets in one engine (their configs' training sections are this trainer's)."""
        tc, acc = self.config.training, self.accelerator
        tokenizer = getattr(train, "tokenizer", None)  # text: saved beside every checkpoint
        for slot in slots:
            if not (slot.folder / "init").exists():
                save_model(slot.model, slot.folder / "init", tokenizer)
        # a captured CUDA graph replays the learning rate it captured: a schedule runs the steps eagerly
        graphs = tc.cuda_graphs and not is_scheduled(tc)
        models, seeds = [slot.model for slot in slots], [slot.random_seed for slot in slots]
        engine = make_engine(tc.engine, models, tc, acc.device, random_seeds=seeds, cuda_graph=graphs)
        steps_per_epoch = len(train) // tc.batch_size
        total = self._total_steps = total_steps(tc, len(train))
        self._epochs = -(-total // max(1, steps_per_epoch))  # max_steps may end the run before training.epochs
        step = engine.step_index = self._maybe_resume(engine, slots) if self.resume else 0
        save_steps = {s for s in tc.save_steps if s <= total}
        if len(save_steps) < len(set(tc.save_steps)):
            logger.warning(
                "training.save_steps %s come after the run's last step (%d): not saved",
                sorted(set(tc.save_steps) - save_steps),
                total,
            )
        bar = tqdm(
            total=total,
            initial=step,
            desc=f"train {len(slots)} nets",
            disable=not self.progress,
            dynamic_ncols=True,
            leave=False,
            mininterval=FINITE_CHECK_S,
        )
        t0 = time.perf_counter()
        if step < total:
            bar.set_postfix_str(f"{steps_per_epoch} steps/epoch")
        # per net, on the device: the first step with a non-finite loss, or 0; read back at each check only
        first_bad = torch.zeros(len(slots), dtype=torch.long, device=acc.device)
        next_check = time.perf_counter() + FINITE_CHECK_S
        self._since_eval = [torch.zeros(len(slots), device=acc.device), 0]  # train loss since the last evaluation
        self._stopped: set[int] = set()  # slots stopped by training.stop_when_flat: final saved, no more steps
        while step < total and len(self._stopped) < len(slots):
            epoch, offset = divmod(step, steps_per_epoch)
            orders = torch.stack([epoch_order(slot.data_seed, epoch, len(train), acc.device) for slot in slots])
            loss_sum = torch.zeros(len(slots), device=acc.device)
            batches = range(offset, min(steps_per_epoch, offset + total - step))
            for b in batches:
                if is_scheduled(tc):
                    engine.set_lr(lr_at(tc, step, total))
                loss = engine.step(*train.batches(orders[:, b * tc.batch_size : (b + 1) * tc.batch_size]))
                loss_sum += loss
                self._since_eval[0] += loss
                self._since_eval[1] += 1
                step += 1
                first_bad = torch.where((first_bad == 0) & ~torch.isfinite(loss), step, first_bad)  # no host sync
                bar.update(1)
                if step in save_steps:
                    self._check_finite(first_bad, slots)
                    for k, slot in enumerate(slots):
                        if k not in self._stopped:
                            save_model(engine.export(k), slot.folder / f"step-{step}", tokenizer)
                elif time.perf_counter() >= next_check:  # one host sync per refresh of the bar, not per step
                    self._check_finite(first_bad, slots)
                    next_check = time.perf_counter() + FINITE_CHECK_S
                if tc.eval_steps and step % tc.eval_steps == 0 and step < total:
                    self._check_finite(first_bad, slots)
                    self._log_evaluation(engine, slots, step, test, f"step {step}/{total}", t0)
                    self._stop_flat(engine, slots, step, tokenizer)
                    if len(self._stopped) == len(slots):
                        break
            self._check_finite(first_bad, slots)
            if len(self._stopped) == len(slots):
                break
            self._epoch_end(engine, slots, epoch, loss_sum / max(1, len(batches)), test, t0, step)
            self._stop_flat(engine, slots, step, tokenizer)
        bar.close()
        for k, slot in enumerate(slots):
            if k not in self._stopped:
                self._finish(engine, k, slot, step, tokenizer, flat=False)

    def _finish(self, engine, k, slot, step, tokenizer, flat: bool) -> None:
        """Save net k's final checkpoint and log_history (with its stop record under `stop_when_flat`); its resume
        points go."""
        criterion = self.config.training.stop_when_flat
        save_model(engine.export(k), slot.folder / "final", tokenizer)
        record = {"log_history": slot.log_history}
        if criterion is not None:
            record["stop"] = stop_record(slot.log_history, step, flat, criterion.model_dump())
        write_json_atomic(slot.folder / "log_history.json", record)
        for old in slot.folder.glob("resume-step-*"):
            shutil.rmtree(old, ignore_errors=True)

    def _stop_flat(self, engine, slots, step, tokenizer) -> None:
        """`training.stop_when_flat`: every net still training whose held-out curve has flattened
        (`flat_stop.is_flat`) is saved as it is now and trains no further (the per-net engine skips it; the
        stacked engine keeps stepping it, unsaved)."""
        criterion = self.config.training.stop_when_flat
        if criterion is None:
            return
        for k, slot in enumerate(slots):
            if k in self._stopped or not is_flat(
                held_out_curve(slot.log_history), criterion.patience, criterion.min_delta
            ):
                continue
            self._finish(engine, k, slot, step, tokenizer, flat=True)
            self._stopped.add(k)
            if hasattr(engine, "paused"):
                engine.paused.add(k)
            logger.info("%s: held-out loss flat at step %d; stopped (training.stop_when_flat)", slot.name, step)
            if self.progress:
                tqdm.write(f"{slot.name}: held-out loss flat at step {step}; stopped")

    def _check_finite(self, first_bad: torch.Tensor, slots) -> None:
        """Stop at a non-finite loss, naming the net and its first bad step, before anything of the diverged nets is
        saved (checked at an epoch's end, a saved step, and every `FINITE_CHECK_S` between). The last resume point
        stays, as after SIGTERM."""
        bad = [(slot.name, s) for slot, s in zip(slots, first_bad.tolist()) if s]
        if bad:
            name, step = min(bad, key=lambda b: b[1])
            lr = self.config.training.lr
            raise TrainingDiverged(
                f"{name}'s training loss became non-finite (NaN or inf) at step {step}: the "
                f"training diverged; lower the learning rate (training.lr is {lr:g}; try "
                f"--set training.lr={lr / 10:g}) and train again with --overwrite"
            )

    def _epoch_end(self, engine, slots, epoch, mean_loss, test, t0, step) -> None:
        tc = self.config.training
        where = f"epoch {epoch + 1}/{self._epochs}"
        if tc.eval_each_epoch:
            self._log_evaluation(engine, slots, step, test, where, t0)
        else:
            losses = zip(slots, mean_loss.tolist())
            self._log_line(
                where,
                t0,
                step,
                {s.name: {"train_loss": loss} for k, (s, loss) in enumerate(losses) if k not in self._stopped},
            )
        if step < self._total_steps:  # a resume point at every epoch end but the last (final follows)
            self._save_resume(engine, slots, step)

    def _log_evaluation(self, engine, slots, step, test, where, t0) -> None:
        """Evaluate every net on the test split (text: the held-out books), log it with the mean training loss
        since the last evaluation, and keep it in each net's log_history (nets stopped by stop_when_flat: not)."""
        stopped = getattr(self, "_stopped", set())
        first = next(slot for k, slot in enumerate(slots) if k not in stopped)
        if first.log_history and first.log_history[-1]["step"] == step:
            return  # evaluated at this step already (an eval step that ends an epoch)
        total, count = self._since_eval
        train_losses = (total / max(1, count)).tolist()  # one host sync per evaluation
        self._since_eval = [torch.zeros_like(total), 0]
        evals = engine.evaluate(*test.tensors())
        values = {}
        for k, (slot, train_loss, (test_loss, test_acc)) in enumerate(zip(slots, train_losses, evals)):
            if k in stopped:
                continue
            values[slot.name] = {"train_loss": train_loss, "test_loss": test_loss, "test_acc": test_acc}
            slot.log_history.append({"step": step, **values[slot.name]})
        self._log_line(where, t0, step, values)

    def _log_line(self, where, t0, step, values: dict[str, dict[str, float]]) -> None:
        tc, acc = self.config.training, self.accelerator
        test = "held-out" if self.config.data.is_text else "test"
        line = f"{where} ({time.perf_counter() - t0:.1f} s)"
        logs = {}
        for name, v in values.items():
            line += f" | {name}: train loss {v['train_loss']:.4f}"
            if "test_loss" in v:
                line += (
                    f" {test} loss {v['test_loss']:.4f}"
                    if self.config.data.is_text
                    else f" test acc {v['test_acc']:.4f}"
                )
            logs.update({f"{name.replace(' ', '_')}/{k}": x for k, x in v.items()})
        logger.info(line)
        if self.progress:
            tqdm.write(line)
        if tc.log_with:
            acc.log(logs, step=step)

    def _save_resume(self, engine, slots, step) -> None:
        for k, slot in enumerate(slots):
            if k in self._stopped:
                continue
            tensors, meta = engine.optimizer_state(k)
            folder = slot.folder / f"resume-step-{step}"
            save_resume_state(folder, engine.export(k), tensors, meta, step, slot.log_history)
        for k, slot in enumerate(slots):  # older points go only once every net has the new one
            if k in self._stopped:
                continue
            for old in slot.folder.glob("resume-step-*"):
                if int(old.name.rsplit("-", 1)[1]) < step:
                    shutil.rmtree(old, ignore_errors=True)

    def _maybe_resume(self, engine, slots) -> int:
        """Continue from the newest step that every net saved; 0 when none did."""
        from safetensors.torch import load_file

        common = None
        for slot in slots:
            steps = {int(p.name.rsplit("-", 1)[1]) for p in slot.folder.glob("resume-step-*")}
            common = steps if common is None else common & steps
        if not common:
            return 0
        step = max(common)
        for k, slot in enumerate(slots):
            folder = slot.folder / f"resume-step-{step}"
            tensors, meta, _, slot.log_history = load_resume_state(folder)
            weights = load_file(str(folder / "model.safetensors"))
            model = engine.export(k)
            with torch.no_grad():  # every tensor of the state: parameters and buffers (BatchNorm statistics),
                for n, t in unique_state(model).items():  # each tied tensor once, under the name it was saved
                    t.copy_(weights[n])
            if hasattr(engine, "params"):
                with torch.no_grad():
                    for n in engine.params:
                        engine.params[n][k].copy_(weights[n])
            engine.load_optimizer_state(k, tensors, meta)
        load_rng_state(slots[0].folder / f"resume-step-{step}")
        logger.info("resumed %s from step %d", [slot.name for slot in slots], step)
        return step

    # -- summary ---------------------------------------------------------------------------------------
    def _write_pair_json(self, train, test, train_s, trained_together: int = 1) -> list[dict]:
        cfg = self.config
        metrics = []
        for i in range(cfg.training.num_nets):
            folder = self.folder / f"net_{i}"
            model = load_model(folder / "final")
            model.to(self.accelerator.device)
            model.eval()
            loss, acc = evaluate_model(model, *test.tensors())
            history = read_json(folder / "log_history.json") if (folder / "log_history.json").is_file() else {}
            metrics.append(
                {
                    "net": i,
                    "test": {"loss": loss, "acc": acc},
                    **{k: history[k] for k in ("log_history", "stop") if k in history},
                }
            )
        pair = pair_record(cfg, train, test, metrics, train_s, trained_together)
        write_json_atomic(self.folder / "pair.json", pair)
        return metrics


def _without_seed(config: RunConfig) -> dict:
    d = config.to_dict()
    d["training"] = {k: v for k, v in d["training"].items() if k != "seed"}
    return d


def train_together(trainers: list[PairTrainer]) -> list[TrainResult]:
    """Train several pairs whose configs differ only in `training.seed` as one stack of nets.

    A sweep's seeds of one cell (Fig. 2: 6 seeds x 2 nets) become one engine of 12 nets: one batched
    step instead of six, the same weights as training each pair alone (each net depends only on its
    own seeds; the stacked engine's steps are elementwise per net). Each pair folder is written as
    `PairTrainer.train` writes it; `timings.train_s` is the group's time split evenly, with
    `timings.trained_together` the number of pairs. One process only (a sweep shares out whole cells).
    """
    if not trainers:
        return []
    first = trainers[0]
    reference = _without_seed(first.config)
    for t in trainers:
        if _without_seed(t.config) != reference:
            raise ValueError(
                f"train_together needs configs that differ only in training.seed; {t.output_dir} differs "
                f"from {first.output_dir}"
            )
        if t.accelerator.num_processes > 1:
            raise ValueError("train_together runs in one process; under several processes train pairs one by one")
    train, test = first._splits()
    with contextlib.ExitStack() as jobs:
        for t in trainers:
            jobs.enter_context(t.writing())
            t._prepare_output()
        start = time.perf_counter()
        slots = []
        for t in trainers:
            nets = t._unfinished(range(t.config.training.num_nets))
            slots += [replace(slot, name=f"{t.output_dir.name}/{slot.name}") for slot in t._slots(nets)]
        if slots:
            first._train_slots(slots, train, test)
        train_s = (time.perf_counter() - start) / len(trainers)
        metrics = [t._write_pair_json(train, test, train_s, trained_together=len(trainers)) for t in trainers]
    return [TrainResult(t.output_dir, m, train_s) for t, m in zip(trainers, metrics)]
