"""Private robust conformal prediction on Lipschitz classifiers (docs/design.md §6).

* ``scores``: non-conformity scores on logits with derived Lipschitz constants and bounds over a logit ball.
* ``calibration``: split conformal threshold, vanilla and robust (lip-rcp) sets, coverage and set size.
* ``private_quantile``: an eps-DP threshold (exponential mechanism, Private Prediction Sets) keeping coverage.
"""

from lipdp.conformal.calibration import (
    conformal_quantile,
    conformal_rank,
    coverage,
    mean_set_size,
    prediction_sets,
    true_label_scores,
)
from lipdp.conformal.private_quantile import (
    DEFAULT_GRID_SIZE,
    PrivateQuantile,
    PrivateTarget,
    corrected_target,
    default_grid,
    private_conformal_quantile,
    private_target,
)
from lipdp.conformal.scores import ScoreBounds, SigmoidScore, SoftmaxScore, logit_radius, make_score

__all__ = [
    "DEFAULT_GRID_SIZE", "PrivateQuantile", "PrivateTarget", "ScoreBounds", "SigmoidScore", "SoftmaxScore",
    "conformal_quantile", "conformal_rank", "corrected_target", "coverage", "default_grid", "logit_radius",
    "make_score", "mean_set_size", "prediction_sets", "private_conformal_quantile", "private_target",
    "true_label_scores",
]
