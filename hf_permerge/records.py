"""The JSON files the tool writes and reads back (pair.json, alignment.json, merge_config.json, trainer_state.json):
the fields it relies on, and one reader that refuses a malformed file naming it and what is wrong.

A user's folder may hold a file edited by hand, truncated or from another tool; reading one must end in a clear
one-line error, never a traceback. Unknown fields are allowed (a newer version may add some).
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class PairRecord(_Record):
    """pair.json: how a pair's nets were made."""

    num_nets: int = Field(ge=1)
    config: dict | None = None
    """The run config the nets were made with (a pair made by other tools may lack it; evaluate then needs one)."""
    timings: dict = Field(default_factory=dict)
    nets: list[dict] = Field(default_factory=list)


class AlignmentRecord(_Record):
    """alignment.json (beside `hf-permerge align`'s permutations) and merge_config.json (a merged model's): which
    nets the permutations belong to, and how they were found."""

    fingerprints: list[str] | None = None
    alignment: dict | None = None


class TrainerStateRecord(_Record):
    """trainer_state.json of a resume point."""

    step: int = Field(ge=0)
    optimizer: dict


def read_json(path: str | Path, fix: str = "") -> dict:
    """A JSON object from a file, or a ValueError naming the file and the problem (`fix`: how to get a good one).
    Strict: a bare NaN or Infinity, which the tool never writes, is refused too."""
    path = Path(path)
    how = f"; {fix}" if fix else ""

    def refuse(constant):
        raise ValueError(f"{constant} is not a JSON number")

    try:
        data = json.loads(path.read_text(), parse_constant=refuse)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}){how}"
        ) from None
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}){how}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, not a {type(data).__name__}{how}")
    return data


def read_record(path: str | Path, record: type[_Record], fix: str = "") -> dict:
    """`read_json`, then the fields the tool relies on checked by `record`; returns the file's mapping."""
    data = read_json(path, fix)
    try:
        record.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        raise ValueError(f"{path} is malformed: {key}: {e['msg']}" + (f"; {fix}" if fix else "")) from None
    return data
