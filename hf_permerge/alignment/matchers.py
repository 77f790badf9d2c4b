"""The registry of matchers by name: the built-in ones, and any a user registers.

    get_matcher("activation", similarity="correlation").match(model_a, model_b, data)

The names and settings of the built-in matchers are declared once, in `hf_permerge.matching`; the classes here
must cover those settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from ..matching import MATCHER_SETTINGS, settings_for
from .activation import ActivationMatcher
from .base import Matcher
from .beyond import SymmetryMatcher
from .gradient import GradientMatcher
from .weight import WeightMatcher

MATCHERS: dict[str, type[Matcher]] = {}


def register_matcher(cls: type[Matcher]) -> type[Matcher]:
    """Register a matcher class under its name; a built-in one is named in `hf_permerge.matching`'s registry,
    whose settings model its fields must cover."""
    declared = MATCHER_SETTINGS.get(cls.name)
    if declared is not None:
        missing = set(declared.model_fields) - {f.name for f in dataclasses.fields(cls)}
        if missing:
            raise TypeError(f"matcher {cls.name!r} lacks the settings its model declares: {sorted(missing)}")
    MATCHERS[cls.name] = cls
    return cls


for _builtin in (ActivationMatcher, WeightMatcher, GradientMatcher, SymmetryMatcher):
    register_matcher(_builtin)


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
    """The entries of `values` (a config section, parsed CLI options) that are settings of matcher `name` (its
    model in `hf_permerge.matching`); None means "not given", so the matcher's default applies."""
    return settings_for(name, values)
