"""The registry of matchers by name: the built-in ones, and any a user registers.

    get_matcher("activation", similarity="correlation").match(model_a, model_b, data)
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from .activation import ActivationMatcher
from .base import Matcher
from .gradient import GradientMatcher
from .weight import WeightMatcher

MATCHERS: dict[str, type[Matcher]] = {cls.name: cls for cls in (ActivationMatcher, WeightMatcher, GradientMatcher)}


def register_matcher(cls: type[Matcher]) -> type[Matcher]:
    MATCHERS[cls.name] = cls
    return cls


def get_matcher(name: str, **settings) -> Matcher:
    """`get_matcher("activation", similarity="correlation")` -> a configured matcher."""
    if name not in MATCHERS:
        raise ValueError(f"unknown matcher {name!r}; choose one of {sorted(MATCHERS)}")
    cls = MATCHERS[name]
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        raise ValueError(f"matcher {name!r} has no setting(s) {unknown}; its settings are {fields}")
    return cls(**settings)


def matcher_settings(name: str, values: Mapping) -> dict:
    """The entries of `values` (a config section, parsed CLI options) that are settings of matcher `name`;
    None means "not given", so the matcher's default applies."""
    fields = {f.name for f in dataclasses.fields(MATCHERS[name])} if name in MATCHERS else set()
    return {k: v for k, v in values.items() if k in fields and v is not None}
