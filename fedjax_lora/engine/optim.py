"""Optimizers and learning-rate schedules of the reproduced papers, built with optax."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax.numpy as jnp
import optax

Schedule = Literal["constant", "cosine", "warmup_cosine", "one_cycle"]


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


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """An optax optimizer with a schedule over the client's own optimizer steps.

    name: `adamw`, `adam` or `sgd`. schedule: `constant`; `cosine` (to `lr·final_lr_fraction` over
    `total_steps`); `warmup_cosine` (linear warm-up for `warmup_steps`, then cosine); `one_cycle`
    (PyTorch OneCycleLR, see `one_cycle`).
    """

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 2e-3
    schedule: Schedule = "constant"
    total_steps: int = 1000
    warmup_steps: int = 0
    final_lr_fraction: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4

    def __post_init__(self):
        if self.name not in ("adamw", "adam", "sgd"):
            raise ValueError(f"unknown optimizer {self.name!r}; choose adamw, adam or sgd")
        if self.schedule not in ("constant", "cosine", "warmup_cosine", "one_cycle"):
            raise ValueError(
                f"unknown schedule {self.schedule!r}; choose constant, cosine, warmup_cosine or "
                "one_cycle"
            )
        if self.lr <= 0:
            raise ValueError(f"learning rate must be positive, got {self.lr}")

    def learning_rate(self) -> optax.ScalarOrSchedule:
        if self.schedule == "constant":
            return self.lr
        if self.schedule == "cosine":
            return optax.cosine_decay_schedule(self.lr, self.total_steps, self.final_lr_fraction)
        if self.schedule == "warmup_cosine":
            return optax.warmup_cosine_decay_schedule(
                0.0,
                self.lr,
                self.warmup_steps,
                self.total_steps,
                self.lr * self.final_lr_fraction,
            )
        return one_cycle(
            self.lr,
            self.total_steps,
            pct_start=self.pct_start,
            div_factor=self.div_factor,
            final_div_factor=self.final_div_factor,
        )

    @functools.cache  # noqa: B019 - frozen and hashable: equal configs share one optimizer
    def build(self) -> optax.GradientTransformation:
        """The optax transformation; equal configs return the same object, so functions compiled
        with it as a static argument are reused."""
        lr = self.learning_rate()
        if self.name == "adamw":
            opt = optax.adamw(lr, self.b1, self.b2, self.eps, weight_decay=self.weight_decay)
        elif self.name == "adam":
            opt = optax.adam(lr, self.b1, self.b2, self.eps)
        else:
            opt = optax.sgd(lr)
        if self.grad_clip > 0:
            opt = optax.chain(optax.clip_by_global_norm(self.grad_clip), opt)
        return opt
