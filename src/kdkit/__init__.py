"""kdkit: knowledge distillation for computer vision."""

__version__ = "0.1.0"
