"""AdamW with a warmup-then-cosine schedule, decaying only the matrices that should decay."""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim

from appleslm.config import LoopConfig


def learning_rate_schedule(cfg: LoopConfig):
    """Linear warmup to `lr`, then cosine decay to `min_lr_ratio * lr` at the last step.

    A warmup as long as the run is cut to end one step before it, so the peak is reached.
    """
    floor = cfg.lr * cfg.min_lr_ratio
    warmup_steps = min(cfg.warmup_steps, max(0, cfg.steps - 1))
    cosine = optim.cosine_decay(cfg.lr, max(1, cfg.steps - warmup_steps), end=floor)
    if warmup_steps == 0:
        return cosine
    warmup = optim.linear_schedule(cfg.lr / warmup_steps, cfg.lr, warmup_steps)
    return optim.join_schedules([warmup, cosine], [warmup_steps])


def decays(path: str, parameter: mx.array) -> bool:
    """Weight decay applies to matrices only: not to norms, and not to the generator's spline
    coefficients, which multiply across 100+ seed dims and would collapse the modes if shrunk."""
    return parameter.ndim >= 2 and not path.endswith("spline")


def build_optimizer(cfg: LoopConfig) -> optim.Optimizer:
    schedule = learning_rate_schedule(cfg)

    def adamw(weight_decay: float) -> optim.AdamW:
        # bias_correction defaults to False in MLX; PyTorch and the papers' recipes correct.
        return optim.AdamW(
            schedule,
            betas=[cfg.beta1, cfg.beta2],
            eps=cfg.eps,
            weight_decay=weight_decay,
            bias_correction=True,
        )

    return optim.MultiOptimizer([adamw(cfg.weight_decay), adamw(0.0)], [decays])
