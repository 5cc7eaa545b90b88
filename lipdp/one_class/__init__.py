"""Private one-class classification with 1-Lipschitz signed distance functions (OCSDF, Bethune et al. 2023).

* ``generator``: public priors and the Newton-style negative sampler;
* ``loss``: the one-class HKR loss and its Lipschitz constant (private term only);
* ``metrics``: AUROC, certified AUROC at an L2 radius, AUROC under an L2 PGD attack;
* ``training``: the OCSDF loop, plain or through ``LipDPEngine``;
* ``subspace``: the private subspace detector (distance to the private principal subspace, 1-Lipschitz),
  and the subspace coordinates an OCSDF network can take as its input.
"""

from lipdp.one_class.generator import BallPrior, BoxPrior, NegativeSampler, Prior
from lipdp.one_class.loss import OneClassHKR
from lipdp.one_class.metrics import attack_scores, attacked_auroc, auroc, certified_auroc, scores
from lipdp.one_class.subspace import SubspaceCoordinates, SubspaceResidual, fit_private_subspace, fit_subspace
from lipdp.one_class.training import ocsdf_step_loss, train_ocsdf

__all__ = [
    "BallPrior", "BoxPrior", "NegativeSampler", "OneClassHKR", "Prior", "attack_scores",
    "SubspaceCoordinates", "SubspaceResidual", "attacked_auroc", "auroc", "certified_auroc", "fit_private_subspace", "fit_subspace",
    "ocsdf_step_loss", "scores", "train_ocsdf",
]
