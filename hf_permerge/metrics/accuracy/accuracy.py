"""Top-1 accuracy as an `evaluate` metric module, shipped with the package since the Hub's
`accuracy` cannot be loaded offline."""

import datasets
import evaluate
import numpy as np

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
Accuracy: the fraction of predicted class labels equal to the reference labels, as reported for the
endpoint, averaged and interpolated networks of the paper.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels (argmax of the logits).
    references (`list` of `int`): ground-truth labels.
Returns:
    accuracy (`float`): in [0, 1].
Examples:
    >>> from hf_permerge.metrics import load_metric       # evaluate.load(metric_path("accuracy")), from any folder
    >>> accuracy = load_metric("accuracy")
    >>> accuracy.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2])
    {'accuracy': 0.75}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            reference_urls=["https://github.com/freedbee/permuted_initialisations"],
        )

    def _compute(self, predictions, references):
        predictions, references = np.asarray(predictions), np.asarray(references)
        if len(predictions) == 0:
            raise ValueError("accuracy needs at least one prediction")
        return {"accuracy": float((predictions == references).mean())}
