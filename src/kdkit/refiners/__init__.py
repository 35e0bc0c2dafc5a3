"""Refiners: data refiners change the training batch before teacher and student see it (style
augmentation); feature refiners change tapped teacher features. Importing this package registers them
in :data:`kdkit.registry.REFINERS`."""

from .base import DataRefiner, FeatureRefiner, RefinerContext
from .dafa import DAFARefiner
from .style import StyleRefiner
from .tst import TSTRefiner

__all__ = ["DAFARefiner", "DataRefiner", "FeatureRefiner", "RefinerContext", "StyleRefiner", "TSTRefiner"]
