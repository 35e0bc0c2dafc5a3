"""kdkit: knowledge distillation for computer vision.

The public API is small; everything else is importable from its module.
"""

from .api import distill, evaluate_student, inspect_config, registries, train_from_config
from .config import OptimizerConfig, RunConfig, RuntimeConfig, ScheduleConfig, load_config
from .data import build_dataset
from .deploy.export import load_student
from .engine.distiller import Distiller
from .engine.trainer import Stage, Trainer
from .errors import ConfigError, KdkitError
from .models import build_model, load_weights, save_weights

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Distiller",
    "KdkitError",
    "OptimizerConfig",
    "RunConfig",
    "RuntimeConfig",
    "ScheduleConfig",
    "Stage",
    "Trainer",
    "build_dataset",
    "build_model",
    "distill",
    "evaluate_student",
    "inspect_config",
    "load_config",
    "load_student",
    "load_weights",
    "registries",
    "save_weights",
    "train_from_config",
]
