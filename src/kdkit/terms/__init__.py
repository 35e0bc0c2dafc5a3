"""Loss terms. Importing this package registers every term in :data:`kdkit.registry.TERMS`.

Each term is a plain function (tensors in, scalar out) plus a :class:`Term` module that reads its
inputs from a :class:`StepView`; the constructor's keyword arguments are the term's config keys.
"""

from .base import LOGITS, StepView, Term
from .contrastive import CRD, nce_loss
from .dam import DAM
from .dense_kd import (
    DenseKD,
    binary_kd_loss,
    dense_box_loss,
    softmax_kd_loss,
    teacher_confidence,
)
from .detection import PKD, Det, Mimic, mimic_loss, pkd_loss, pkd_normalize
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
from .fgd import (  # noqa: F401 (registers 'fgd')
    FGD,
    GcBlock,
    fgd_attention,
    fgd_focal_loss,
    fgd_focal_parts,
    fgd_global_loss,
    fgd_masks,
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
from .review import ReviewKD, hcl_loss
from .segmentation import (
    CWD,
    I2CKD,
    Spirit,
    cwd_loss,
    i2ckd_loss,
    i2ckd_prototypes,
    spirit_loss,
)

__all__ = [
    "AT",
    "CE",
    "CRD",
    "CWD",
    "DAM",
    "PKD",
    "Det",
    "DenseKD",
    "Mimic",
    "binary_kd_loss",
    "dense_box_loss",
    "mimic_loss",
    "pkd_loss",
    "pkd_normalize",
    "softmax_kd_loss",
    "teacher_confidence",
    "DIST",
    "DKD",
    "DKDLS",
    "I2CKD",
    "KD",
    "KDLS",
    "LOGITS",
    "RKD",
    "ReviewKD",
    "SP",
    "FitNet",
    "Spirit",
    "StepView",
    "Term",
    "at_loss",
    "attention_map",
    "ce_loss",
    "class_rows",
    "cwd_loss",
    "dist_loss",
    "dkd_loss",
    "fitnet_loss",
    "i2ckd_loss",
    "i2ckd_prototypes",
    "kd_loss",
    "hcl_loss",
    "nce_loss",
    "kl_divergence",
    "pairwise_differences",
    "pearson_correlation",
    "rkd_angles",
    "rkd_distances",
    "rkd_loss",
    "sp_loss",
    "spirit_loss",
    "standardize_logits",
]
