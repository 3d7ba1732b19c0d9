"""Optimizers and learning-rate schedules of the reproduced papers, built with optax."""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax

from fedjax_lora.settings import OptimizerConfig, Schedule

__all__ = ["OptimizerConfig", "Schedule", "one_cycle"]


def one_cycle(
    max_lr: float,
    total_steps: int,
    *,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> optax.Schedule:
    """PyTorch `OneCycleLR(anneal_strategy="cos", three_phase=False)` stepped once per iteration.

    Start `max_lr / div_factor`; cosine up to `max_lr` at step `pct_start·total - 1`; cosine down to
    `start / final_div_factor` at step `total - 1`. Within a phase from step a to b:
    `lr = end + (start - end)/2 · (1 + cos(π (t - a)/(b - a)))`. The trust-weighted runs use
    total 500, pct_start 0.02, div 100, final_div 0.05 (so the minimum is 4e-4, not ~0).
    """
    initial = max_lr / div_factor
    final = initial / final_div_factor
    peak_step = float(pct_start * total_steps) - 1.0
    last_step = float(total_steps - 1)

    def anneal(start, end, pct):
        return end + (start - end) / 2.0 * (1.0 + jnp.cos(math.pi * pct))

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        up = anneal(initial, max_lr, jnp.clip(t / peak_step, 0.0, 1.0))
        down_pct = jnp.clip((t - peak_step) / (last_step - peak_step), 0.0, 1.0)
        return jnp.where(t <= peak_step, up, anneal(max_lr, final, down_pct))

    return schedule
