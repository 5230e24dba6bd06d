"""Training: the pretraining loop, checkpoints, metrics and evaluation."""
