"""What each matcher can be told: one pydantic model of settings per matcher, and the registry of their names.

The run config's `alignment` section, its validation and the CLI's matching flags are all derived from these
models, so a setting is declared once. Torch-free, so that the command line can build its flags instantly.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class MatcherSettings(BaseModel):
    """Base class: the fields are a matcher's settings (constructor kwargs), each with its default and help."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ActivationSettings(MatcherSettings):
    """Activation matching (the paper's Sec. 2): match the units whose activations agree on data."""

    similarity: Literal["cosine", "correlation", "l2"] = Field(
        "cosine", description="the similarity (default cosine, uncentred)"
    )
    preactivation: bool = Field(False, description="match activations before the non-linearity")
    products: Literal["float32", "float64"] = Field(
        "float32",
        description="dtype of the n x n products of mean-shifted activations (default float32; "
        "float64: exact, 2x slower on CPUs)",
    )
    num_examples: int = Field(
        10000, ge=1, description="examples to use (images or text sequences), a seeded subset (default 10000)"
    )
    max_statistics_mb: int | None = Field(
        None,
        ge=1,
        description="bound the statistics held at once (MiB): groups are gathered in several passes over the "
        "data, each stopping after the last layer it needs (default: all groups in one pass)",
    )


class WeightSettings(MatcherSettings):
    """Weight matching (Git Re-Basin): no data, coordinate descent on the weights."""

    max_iter: int = Field(100, ge=0, description="coordinate-descent sweeps at most (default 100)")
    bottom_up: bool = Field(
        True,
        description="start the descent from the paper's App. D pass (first layer upward, "
        "incoming weights; the default), or (false) from the identity as Git "
        "Re-Basin does; with max_iter 0 the App. D pass alone",
    )

    @model_validator(mode="after")
    def _check_start(self):
        if self.max_iter == 0 and not self.bottom_up:
            raise ValueError(
                "max_iter 0 with bottom_up false would match nothing (the identity); set bottom_up "
                "true (App. D's one pass) or max_iter >= 1"
            )
        return self


class GradientSettings(MatcherSettings):
    """Gradient matching at initialisation (the paper's App. B)."""

    preconditioner: Literal["foof", "none"] = Field(
        "foof", description="FOOF (the paper's App. B, default) or the raw gradient"
    )
    damping: float = Field(
        1.0,
        gt=0,
        description="FOOF damping, relative to the mean eigenvalue of the input "
        "second moment (default 1.0, measured best)",
    )
    num_examples: int = Field(10000, ge=1, description="images to use, a seeded subset of the data (default 10000)")
    max_iter: int = Field(100, ge=0, description="coordinate-descent sweeps at most (default 100)")


class SymmetrySettings(MatcherSettings):
    """Matching beyond permutations (`alignment.beyond`): signed permutations or an orthogonal residual stream.
    Its matcher returns `Transforms`, not `Permutations`, so it is not (yet) one of the run config's matchers."""

    symmetry: Literal["permutation", "signed", "orthogonal"] = Field(
        "signed",
        description="the residual stream's class: permutation; signed (signed permutations of an RMSNorm stream and "
        "of gated MLP units); orthogonal (any orthogonal map once the norms' gains are folded into the layers that "
        "read them; maps fixing the all-ones vector under LayerNorm)",
    )
    head_maps: Literal["none", "values", "all"] = Field(
        "none",
        description="per attention head: none (permutations); values (an invertible map B on the values, B^-T on "
        "the output projection's inputs); all (values, and queries by A with keys by A^-T; under a rotary embedding "
        "a rotation-scaling per frequency pair)",
    )
    head_fit: Literal["least_squares", "procrustes"] = Field(
        "least_squares",
        description="per-head maps: least squares on one projection (any invertible map; exact for a planted one) "
        "or procrustes (orthogonal maps fitted on both projections: well conditioned for unrelated nets)",
    )
    source: Literal["weight", "activation"] = Field(
        "weight",
        description="find the class's elements from the weights (default) or from activations on data: the stream's "
        "signs or orthogonal map and the per-head maps (whole heads and the other groups by weight matching)",
    )
    max_iter: int = Field(100, ge=0, description="coordinate-descent sweeps at most (default 100)")
    seed: int = Field(0, description="the sweeps' order, and the random elements that test the class")
    num_examples: int = Field(10000, ge=1, description="sequences to use with source activation (default 10000)")


MATCHER_SETTINGS: dict[str, type[MatcherSettings]] = {
    "activation": ActivationSettings,
    "weight": WeightSettings,
    "gradient": GradientSettings,
}
"""The registry of matcher names: the one place that knows them (the matcher classes register under these)."""
MATCHER_NAMES = tuple(MATCHER_SETTINGS)


def setting_owners() -> dict[str, list[str]]:
    """Each setting's name -> the matchers that have it, in registry order."""
    owners: dict[str, list[str]] = {}
    for name, model in MATCHER_SETTINGS.items():
        for field in model.model_fields:
            owners.setdefault(field, []).append(name)
    return owners


def all_settings_fields() -> dict:
    """Each setting's name -> its pydantic field (one declaration: a setting two matchers share is declared
    alike in both, which this checks)."""
    fields: dict = {}
    for model in MATCHER_SETTINGS.values():
        for name, info in model.model_fields.items():
            if name in fields and (fields[name].annotation, fields[name].default, fields[name].metadata) != (
                info.annotation,
                info.default,
                info.metadata,
            ):
                raise TypeError(f"matcher setting {name!r} is declared differently by two matchers")
            fields.setdefault(name, info)
    return fields


def settings_for(matcher: str, values) -> dict:
    """The entries of `values` (a config section, parsed CLI options) that are settings of `matcher`; None
    means "not given", so the matcher's default applies."""
    fields = MATCHER_SETTINGS[matcher].model_fields if matcher in MATCHER_SETTINGS else {}
    return {k: v for k, v in values.items() if k in fields and v is not None}
