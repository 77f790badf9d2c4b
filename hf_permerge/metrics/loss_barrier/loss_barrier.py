"""Loss barrier (eq. 2 of Benzing et al., 2022) as an `evaluate` metric module.

This file is copied by `evaluate.load` into its modules cache, so it imports the package absolutely
and delegates to the one barrier function, `hf_permerge.evaluation.barrier.loss_barrier`.
"""

import datasets
import evaluate

from hf_permerge.evaluation.barrier import loss_barrier

_CITATION = """\
@article{benzing2022random,
  title   = {Random initialisations performing above chance and how to find them},
  author  = {Benzing, Frederik and Schug, Simon and Meier, Robert and von Oswald, Johannes and Akram, Yassir
             and Zucchet, Nicolas and Aitchison, Laurence and Steger, Angelika},
  journal = {arXiv preprint},
  year    = {2022},
  url     = {https://github.com/freedbee/permuted_initialisations}
}
"""

_DESCRIPTION = """\
The loss barrier between two networks theta_a and theta_b (eq. 2 of the paper): the largest excess of
the loss along the linear interpolation (1 - lambda) * theta_a + lambda * theta_b over the straight
line between the endpoint losses,
    max_lambda  v(lambda) - ((1 - lambda) v(0) + lambda v(1)).
For accuracy (kind="accuracy") the sign is flipped: the largest drop of the curve below the line
between the endpoint accuracies. Zero means the two networks lie in one linearly connected valley.
Each example is one point of the curve: a lambda and the value measured there.
"""

_KWARGS_DESCRIPTION = """
Args:
    lambdas (`list` of `float`): interpolation weights; must include 0 (theta_a) and 1 (theta_b), any order.
    values (`list` of `float`): the loss (or accuracy) of the network at each lambda.
    kind (`str`, defaults to "loss"): "loss" (lower is better) or "accuracy" (higher is better).
Returns:
    barrier (`float`): the barrier, >= 0.
    lambda (`float`): the lambda where it occurs (the smallest one on ties).
Examples:
    >>> from hf_permerge.metrics import load_metric       # evaluate.load(metric_path("loss_barrier")), from any folder
    >>> barrier = load_metric("loss_barrier")
    >>> barrier.compute(lambdas=[0.0, 0.5, 1.0], values=[0.25, 1.25, 0.75])
    {'barrier': 0.75, 'lambda': 0.5}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LossBarrier(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"lambdas": datasets.Value("float64"), "values": datasets.Value("float64")}),
            reference_urls=["https://github.com/freedbee/permuted_initialisations"],
        )

    def _compute(self, lambdas, values, kind="loss"):
        result = loss_barrier(lambdas, values, kind=kind)
        return {"barrier": result.barrier, "lambda": result.lam}
