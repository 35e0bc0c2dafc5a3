"""The training engine: one distiller, a stage-based trainer, checkpoints, evaluation."""
