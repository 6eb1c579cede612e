"""`evaluate` module for LC-Rec ranking metrics (HR@1/5/10, NDCG@5/10).

Usage::

    import evaluate, optimum_odllm.metrics as m
    metric = evaluate.load(m.RANKING_METRIC_PATH)
    metric.compute(predictions=[["i3", "i7"]], references=["i7"])
"""

import datasets
import evaluate

from optimum_odllm.recsys.metrics import ranking_metrics, ranking_metrics_with_stderr


_DESCRIPTION = """Hit ratio and NDCG at K for next-item recommendation with one ground-truth item per user,
as in LC-Rec: HR@K = 1 if the target is in the top-K list, NDCG@K = 1/log2(rank+2) for 0-based rank < K."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of ranked recommendation lists (item ids as strings, best first).
    references: list of ground-truth item ids (strings), one per user.
    with_stderr: also return the standard error over users of each metric (``HR@10_se``, ...; needs 2+ users).
Returns:
    dict with HR@1, HR@5, HR@10, NDCG@5, NDCG@10 (means over users).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Ranking(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.List(datasets.Value("string")), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, with_stderr=False):
        if with_stderr:
            return ranking_metrics_with_stderr(predictions, references)
        return ranking_metrics(predictions, references)
