"""Statistics over seeds (Student-t intervals) and the random-permutation baseline."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from hf_permerge.alignment import Permutations
from hf_permerge.evaluation.statistics import t_interval
from hf_permerge.merging import PermMerger
from hf_permerge.sweeps.experiments import random_permutation_metrics


@pytest.mark.parametrize("values", [[0.5, 0.7], [0.81, 0.83, 0.86], [0.1, 0.4, 0.2, 0.9, 0.3, 0.35, 0.5, 0.45]])
def test_t_interval_is_scipys_with_n_minus_one_degrees_of_freedom(values):
    mean, half = t_interval(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=stats.sem(values))
    assert mean == pytest.approx(sum(values) / len(values))
    assert (mean - half, mean + half) == pytest.approx((low, high), rel=1e-12)


def test_t_interval_of_one_value_has_no_width_and_three_seeds_are_wider_than_two_sem():
    assert t_interval([0.8]) == (0.8, None)
    values = [0.81, 0.83, 0.86]
    assert t_interval(values)[1] > 2 * stats.sem(values) * 2  # t(0.975, 2) = 4.30
    with pytest.raises(ValueError):
        t_interval([])


def test_random_baseline_permutation_is_valid_seeded_and_not_the_identity(tiny_pair, tiny_fmnist):
    from hf_permerge.data import load_tensors

    merger = PermMerger.from_pretrained(tiny_pair)
    for seed in (0, 1):
        p = Permutations.random(merger.spec, seed=seed)
        p.validate(merger.spec)
        assert p == Permutations.random(merger.spec, seed=seed) and not p.is_identity()
    assert Permutations.random(merger.spec, seed=0) != Permutations.random(merger.spec, seed=1)
    test = load_tensors("fashion_mnist", "test", data_dir=tiny_fmnist)
    first = random_permutation_metrics(merger, test, seed=0)
    assert first == random_permutation_metrics(merger, test, seed=0)
    assert set(first) == {"random_acc", "random_loss", "init_random_acc", "init_random_loss"}
    assert all(0.0 <= first[k] <= 1.0 for k in ("random_acc", "init_random_acc"))
    # the baseline is the midpoint of net 0 and a shuffled net 1: by hand
    shuffled = Permutations.random(merger.spec, seed=0).apply(merger.load(1, "final"))
    a = merger.load(0, "final")
    mid = {k: (v + shuffled.state_dict()[k]) / 2 for k, v in a.state_dict().items()}
    a.load_state_dict(mid)
    with torch.no_grad():
        acc = (a(pixel_values=test.pixel_values).logits.argmax(-1) == test.labels).float().mean().item()
    assert first["random_acc"] == pytest.approx(acc, abs=1e-6)
