"""Loss terms. Importing this package registers every term in :data:`kdkit.registry.TERMS`.

Each term is a plain function (tensors in, scalar out) plus a :class:`Term` module that reads its
inputs from a :class:`StepView`; the constructor's keyword arguments are the term's config keys.
"""

from .base import LOGITS, StepView, Term
from .features import (
    AT,
    RKD,
    SP,
    FitNet,
    at_loss,
    attention_map,
    fitnet_loss,
    pairwise_differences,
    rkd_angles,
    rkd_distances,
    rkd_loss,
    sp_loss,
)
from .logits import (
    CE,
    DIST,
    DKD,
    DKDLS,
    KD,
    KDLS,
    ce_loss,
    class_rows,
    dist_loss,
    dkd_loss,
    kd_loss,
    kl_divergence,
    pearson_correlation,
    standardize_logits,
)

__all__ = [
    "AT",
    "CE",
    "DIST",
    "DKD",
    "DKDLS",
    "KD",
    "KDLS",
    "LOGITS",
    "RKD",
    "SP",
    "FitNet",
    "StepView",
    "Term",
    "at_loss",
    "attention_map",
    "ce_loss",
    "class_rows",
    "dist_loss",
    "dkd_loss",
    "fitnet_loss",
    "kd_loss",
    "kl_divergence",
    "pairwise_differences",
    "pearson_correlation",
    "rkd_angles",
    "rkd_distances",
    "rkd_loss",
    "sp_loss",
    "standardize_logits",
]
