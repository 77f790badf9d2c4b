"""Alignment: the permutation spec, `Permutations`, and the matchers that find them.

    from hf_permerge.alignment import get_matcher
    perms = get_matcher("activation", similarity="cosine").match(model_a, model_b, data)
    aligned_b = perms.apply(model_b)      # computes the same function as model_b, lined up with model_a

Models without a hand-written `permutation_spec()` get one from their traced graph:
`attach_permutation_spec(vit, on_unsupported="skip")` (see `tracing`).
"""

from .activation import ActivationMatcher, ActivationStatistics, activation_statistics
from .base import Matcher
from .gradient import GradientMatcher, update_directions
from .hungarian import AssignmentSolver, solve_assignment, solve_assignments, solve_coupled
from .matchers import MATCHERS, get_matcher, register_matcher
from .permutations import Permutations
from .spec import PermGroup, PermutationSpec, apply_permutations, permute_tensor
from .tracing import TracedSpec, attach_permutation_spec, check_permutation_invariance, trace_permutation_spec
from .weight import WeightMatcher, solve_linear_matching

__all__ = [
    "PermGroup",
    "PermutationSpec",
    "apply_permutations",
    "permute_tensor",
    "Permutations",
    "solve_assignment",
    "solve_assignments",
    "solve_coupled",
    "AssignmentSolver",
    "Matcher",
    "MATCHERS",
    "get_matcher",
    "register_matcher",
    "ActivationMatcher",
    "ActivationStatistics",
    "activation_statistics",
    "WeightMatcher",
    "solve_linear_matching",
    "GradientMatcher",
    "update_directions",
    "TracedSpec",
    "trace_permutation_spec",
    "attach_permutation_spec",
    "check_permutation_invariance",
]
