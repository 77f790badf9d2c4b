"""A sweep config: a base run config (the usual sections) plus a `sweep:` section naming the grid.

    sweep:
      name: fig2_fmnist            # file names of the table and figure
      experiment: pair             # what each cell measures: pair | n_way | schedules | matchers | train
      grid:                        # dotted run-config keys -> values; cells are their product
        model.width: [32, 128, 512]
        model.depth: [1, 2]
        training.seed: [0, 1, 2]
      cases:                       # optional named variants, crossed with the grid
        sgd small lr: {training.optimizer: sgd, training.lr: 0.01}

Every cell's run config is validated before anything runs; an unknown key or a bad value is an
error naming the cell and the key. A cell's folder is named after its values (not its index),
so a grid can be extended and the cells already measured are reused.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..config import (
    AlignmentSection,
    ConfigError,
    RunConfig,
    apply_overrides,
    config_from_dict,
    read_yaml_file,
    set_override,
)

SECTIONS = tuple(RunConfig.model_fields)


def config_keys() -> dict[str, list[str]]:
    """The dotted keys a grid may vary: {section: [field, ...]}."""
    return {name: list(field.annotation.model_fields) for name, field in RunConfig.model_fields.items()}


def _mapping_fields(section: str) -> set[str]:
    """The fields of a section that hold a mapping (model.config), whose keys a grid may vary one by one
    (`model.config.hidden_size`); the cell's validation checks them."""
    fields = RunConfig.model_fields[section].annotation.model_fields
    return {name for name, f in fields.items() if getattr(f.annotation, "__origin__", f.annotation) is dict}


def check_key(key: str, where: str) -> None:
    section, _, field = key.partition(".")
    known = config_keys()
    if section in known and "." in field and field.partition(".")[0] in _mapping_fields(section):
        return
    if section not in known:
        raise ValueError(
            f"{where}: {key!r} is not a run-config key; keys look like section.field with a section "
            f"in {list(known)} (e.g. model.width)"
        )
    if field not in known[section]:
        close = difflib.get_close_matches(field.partition(".")[0], known[section], n=1)
        hint = f" (did you mean {section}.{close[0]}?)" if close else ""
        raise ValueError(f"{where}: unknown config key {key!r}{hint}; the keys of {section} are {known[section]}")


class SweepSection(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Names the table and the figure (OUT/<name>.png); letters, digits, `_ . -`."""
    experiment: Literal["pair", "n_way", "schedules", "matchers", "train"]
    """pair, n_way, schedules, matchers: align and merge each cell's nets; train: train them only, keeping their test
    (text: held-out) loss and accuracy, and its curve over training (language models, before they are merged)."""
    description: str = ""
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    cases: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Named variants whose keys change together (e.g. optimiser and learning rate), crossed with the grid."""
    matchers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """experiment `matchers`: label -> `alignment` settings (matcher, checkpoint, ...), each applied to the same pair."""
    x: str | None = None
    """The key along the figure's x axis (`pair`, `matchers`) or one line per value (`n_way`, `schedules`):
    a grid key or `case`. Default: the first grid key other than `seed_key`, else `case`."""
    seed_key: str = "training.seed"
    """Cells that differ only in this key are repeats: the table gives their mean and standard error."""
    keep_pairs: bool = False
    """Keep each cell's pair folder (checkpoints) after it is measured; off by default to save disk."""
    curves: bool = False
    """Keep the interpolation curves (test accuracy and loss) in each cell's result and plot them."""
    stack_seeds: bool = True
    """Train the cells that differ only in `training.seed` as one stack of nets (the same weights as one
    pair at a time, in fewer, larger steps); stacks are capped at `STACK_MAX_PARAMS` parameters."""
    measure_workers: int | Literal["auto"] = "auto"
    """How many cells of a stack are measured at once, on threads: one cell's Hungarian solves (CPU)
    then overlap the others' device work. "auto": up to 8 on a GPU (within half of its memory),
    1 on the CPU (its cores are busy already). The numbers do not depend on it."""

    @field_validator("measure_workers")
    @classmethod
    def _check_workers(cls, workers):
        if workers != "auto" and workers < 1:
            raise ValueError(f"sweep.measure_workers: give a count >= 1 or 'auto', got {workers}")
        return workers

    @field_validator("grid")
    @classmethod
    def _check_grid(cls, grid):
        for key, values in grid.items():
            check_key(key, "sweep.grid")
            if not values:
                raise ValueError(f"sweep.grid.{key}: give at least one value")
            if len({repr(v) for v in values}) != len(values):
                raise ValueError(f"sweep.grid.{key}: repeated values {values}")
        return grid

    @field_validator("cases")
    @classmethod
    def _check_cases(cls, cases):
        for name, values in cases.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9 _.@=+-]*", name):
                raise ValueError(f"sweep.cases: case name {name!r} may only hold letters, digits, spaces and `_.@=+-`")
            for key in values:
                check_key(key, f"sweep.cases[{name!r}]")
        return cases

    @field_validator("matchers")
    @classmethod
    def _check_matchers(cls, matchers):
        for label, settings in matchers.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@=+-]*", label):
                raise ValueError(f"sweep.matchers: label {label!r} may only hold letters, digits and `_.@=+-`")
            try:
                AlignmentSection.model_validate(settings)
            except ValidationError as err:
                e = err.errors()[0]
                key = ".".join(str(p) for p in e["loc"])
                raise ValueError(
                    f"sweep.matchers.{label}.{key}: "
                    + ("unknown alignment setting" if e["type"] == "extra_forbidden" else e["msg"])
                ) from None
        return matchers

    @model_validator(mode="after")
    def _check_axes(self):
        both = set(self.grid) & {k for values in self.cases.values() for k in values}
        if both:
            raise ValueError(f"sweep: key(s) {sorted(both)} set both in the grid and in a case; set each in one place")
        check_key(self.seed_key, "sweep.seed_key")
        if self.x is not None and self.x not in self.grid and not (self.x == "case" and self.cases):
            raise ValueError(f"sweep.x: {self.x!r} is neither a grid key ({list(self.grid)}) nor `case` (with cases)")
        if self.experiment == "matchers" and not self.matchers:
            raise ValueError(
                "sweep.matchers: the `matchers` experiment needs at least one labelled alignment, "
                "e.g. {activation: {matcher: activation, checkpoint: final}, "
                "gradient@init: {matcher: gradient, checkpoint: init}}"
            )
        if self.experiment != "matchers" and self.matchers:
            raise ValueError(f"sweep.matchers is only used by the `matchers` experiment, not {self.experiment!r}")
        return self

    @property
    def x_key(self) -> str | None:
        if self.x is not None:
            return self.x
        return next((k for k in self.grid if k != self.seed_key), "case" if self.cases else None)


@dataclass(frozen=True)
class Cell:
    """One run of the sweep: its folder name, the values that make it, and its validated run config."""

    id: str
    values: dict  # dotted key -> value, and "case" -> case name when there are cases
    config: RunConfig


@dataclass
class SweepConfig:
    sweep: SweepSection
    base: dict  # the base run-config sections as given (after overrides)
    cells: list[Cell]
    source: str

    def to_dict(self) -> dict:
        return {
            "sweep": self.sweep.model_dump(mode="json"),
            "base": self.base,
            "cells": [{"id": c.id, "values": c.values} for c in self.cells],
        }


def _slug(value) -> str:
    text = str(value).replace(" ", "-")
    return re.sub(r"[^A-Za-z0-9._=+@-]", "", text) or "x"


def _short_names(keys: list[str]) -> dict[str, str]:
    """The last part of each dotted key (`model.width` -> `width`), or the whole key where that is ambiguous."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _set_dotted(data: dict, key: str, value) -> None:
    """data[section][field] = value, or deeper for a key inside a mapping field (model.config.hidden_size)."""
    *path, last = key.split(".")
    node = data
    for depth, part in enumerate(path):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key {'.'.join(path[: depth + 1])!r} must be a mapping")
    node[last] = copy.deepcopy(value)


def expand_cells(sweep: SweepSection, base: dict, source: str) -> list[Cell]:
    """The cells: cases (outer) x the grid's product, in the order written; each config validated."""
    cases = list(sweep.cases.items()) or [(None, {})]
    keys = list(sweep.grid)
    names = _short_names(keys)
    cells, seen = [], {}
    for case, case_values in cases:
        for combo in itertools.product(*(sweep.grid[k] for k in keys)):
            values = dict(zip(keys, combo))
            data = copy.deepcopy(base)
            for key, value in {**case_values, **values}.items():
                _set_dotted(data, key, value)
            parts = ([f"case={_slug(case)}"] if case is not None else []) + [
                f"{names[k]}={_slug(v)}" for k, v in values.items()
            ]
            cell_id = "_".join(parts) or "single"
            if cell_id in seen:
                raise ConfigError(
                    f"invalid sweep config {source}: cells {seen[cell_id]} and {values} would share "
                    f"the folder {cell_id!r}; use values that differ when written out"
                )
            seen[cell_id] = values
            config = config_from_dict(data, f"{source} (cell {cell_id})")
            _check_cell(sweep, config, cell_id, source)
            cells.append(Cell(cell_id, ({"case": case} if case is not None else {}) | values, config))
    return cells


def _check_cell(sweep: SweepSection, config: RunConfig, cell_id: str, source: str) -> None:
    where = f"invalid sweep config {source} (cell {cell_id})"
    if config.training.num_nets < 2 and sweep.experiment != "train":
        raise ConfigError(
            f"{where}: every experiment aligns and merges nets, which needs at least 2; set "
            f"training.num_nets >= 2 (got {config.training.num_nets})"
        )
    if config.data.is_text and sweep.experiment != "train":
        raise ConfigError(
            f"{where}: the {sweep.experiment} experiment aligns and merges image classifiers; language models "
            "are trained and measured on held-out text only: set sweep.experiment: train"
        )
    if sweep.experiment == "n_way" and config.training.num_nets < 3:
        raise ConfigError(
            f"{where}: the n_way experiment averages k = 2..N nets; set training.num_nets >= 3 "
            f"(got {config.training.num_nets})"
        )
    if sweep.experiment == "schedules" and not (config.evaluation.schedules or config.evaluation.current_perm):
        raise ConfigError(
            f"{where}: the schedules experiment needs evaluation.schedules (perm@x steps, e.g. [0, 50, 100]) "
            "or evaluation.current_perm: true, and training.save_steps to evaluate at"
        )
    if config.training.log_with:
        raise ConfigError(
            f"{where}: training.log_with is not supported in sweeps (each process trains whole cells "
            "without an Accelerate tracker); leave it unset"
        )


def _format(err: ValidationError, source: str, overrides: list[tuple[str, str]] = ()) -> str:
    """One line per problem; one that a `--set sweep.…` override touched names it, as run configs' errors do."""
    lines = [f"invalid sweep config {source}:"]
    for e in err.errors():
        key = ".".join(["sweep", *(str(p) for p in e["loc"])])
        given = [f"sweep.{path}={raw}" for path, raw in overrides if f"sweep.{path}".startswith(key)]
        origin = f" [from --set {', '.join(given)}]" if given else ""
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key{origin} (the sweep keys are {list(SweepSection.model_fields)})")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(
                f"  {msg}{origin}" if msg.startswith("sweep") else f"  {key}: {msg} (got {e.get('input')!r}){origin}"
            )
    return "\n".join(lines)


def _split_overrides(overrides: list[str] | None) -> tuple[list[str], list[tuple[str, str]]]:
    """Run-config overrides, and `sweep.*` ones as (path after `sweep.`, raw value)."""
    base, sweep = [], []
    for item in overrides or []:
        path = item.split("=", 1)[0].strip()
        if path == "sweep" or path.startswith("sweep."):
            if "=" not in item or path == "sweep":
                raise ConfigError(f"override {item!r} must look like sweep.key=value, e.g. sweep.keep_pairs=true")
            sweep.append((path[len("sweep.") :], item.split("=", 1)[1]))
        else:
            base.append(item)
    return base, sweep


def _sweep_key_path(section: dict, path: str) -> list[str]:
    """Split `grid.model.width` -> [grid, model.width] and `cases.<name>.training.lr` -> [cases, <name>,
    training.lr]: grid keys hold dots, and so may case names (`sgd lr 0.01`), matched against those given."""
    head, _, rest = path.partition(".")
    if head == "grid" and rest:
        return [head, rest]
    if head in ("cases", "matchers") and rest:
        known = section.get(head) if isinstance(section.get(head), dict) else {}
        name = next((n for n in sorted(known, key=len, reverse=True) if rest.startswith(f"{n}.")), None)
        if name is None:
            name, _, rest = rest.partition(".")
        else:
            rest = rest[len(name) + 1 :]
        return [head, name] + ([rest] if rest else [])
    return path.split(".")


def sweep_config_from_dict(data: dict, source: str = "(dict)", overrides: list[str] | None = None) -> SweepConfig:
    if not isinstance(data, dict) or not isinstance(data.get("sweep"), dict):
        raise ConfigError(
            f"sweep config {source} needs a `sweep:` section (name, experiment, grid); see configs/sweeps/"
        )
    data = copy.deepcopy(data)
    section = data.pop("sweep")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(
            f"invalid sweep config {source}:\n  {unknown[0]}: unknown section (the sections are "
            f"{list(SECTIONS)} and sweep)"
        )
    base_overrides, sweep_overrides = _split_overrides(overrides)
    base = apply_overrides(data, base_overrides)
    for path, raw in sweep_overrides:
        set_override(section, _sweep_key_path(section, path), raw, f"sweep.{path}={raw}")
    try:
        sweep = SweepSection.model_validate(section)
    except ValidationError as err:
        raise ConfigError(_format(err, source, sweep_overrides)) from None
    return SweepConfig(sweep, base, expand_cells(sweep, base, source), source)


def load_sweep_config(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """Read and validate a sweep YAML; `overrides` as on the command line (`section.key=value`,
    `sweep.grid.model.width=[32,64]`, `sweep.keep_pairs=true`)."""
    return sweep_config_from_dict(read_yaml_file(path, "sweep config", "configs/sweeps/"), str(path), overrides)
