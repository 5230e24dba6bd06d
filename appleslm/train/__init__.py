"""Training: one loop (`trainer`) and its tasks (`pretrain`, `sft`), with checkpoints, losses,
metrics, the optimizer and sweeps."""
