"""Shared tiny settings for the engine tests (d ≤ 64, vocab ≤ 1k, seq ≤ 32)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import numpy as np

from fedjax_lora import lora
from fedjax_lora.algorithms import Problem
from fedjax_lora.data.streams import eval_windows, stack_streams
from fedjax_lora.engine import LocalTraining, OptimizerConfig, Strategy
from fedjax_lora.models.config import ModelConfig
from fedjax_lora.models.factory import from_config

VOCAB = 64
SEQ = 16
CONFIG = ModelConfig(
    family="gpt2", vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_positions=32
)


def tiny_model(targets=("c_attn.q", "c_attn.v"), rank=4, seed=0):
    model = from_config(CONFIG, seed=seed)
    lora.add_lora(model, lora.LoRAConfig(targets=targets, rank=rank, alpha=8.0))
    return model


def client_streams(num_clients: int, length: int = 300, seed: int = 0) -> list[np.ndarray]:
    """Streams of different lengths and statistics (client i favours tokens near 4·i)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(num_clients):
        n = length - 20 * (i % 3)
        probs = np.exp(-0.5 * ((np.arange(VOCAB) - 4 * i) % VOCAB) / 3.0)
        out.append(rng.choice(VOCAB, size=n, p=probs / probs.sum()).astype(np.int32))
    return out


def tiny_problem(
    num_clients: int = 4,
    *,
    strategy: Strategy = Strategy(),
    steps: int = 2,
    grad_accum: int = 1,
    sampling: str = "random",
    lr: float = 1e-2,
    masks=None,
    optimizer=None,
    val_windows: int = 6,
) -> Problem:
    streams = client_streams(num_clients)
    train = stack_streams(streams, masks)
    val = stack_streams([s[::-1].copy() for s in streams])
    return Problem.create(
        tiny_model(),
        train,
        {"val": eval_windows(val, SEQ, val_windows)},
        training=LocalTraining(
            steps=steps, batch_size=3, seq_len=SEQ, grad_accum=grad_accum, sampling=sampling
        ),
        optimizer=optimizer or OptimizerConfig(lr=lr),
        strategy=strategy,
        eval_batch_size=4,
    )


@contextlib.contextmanager
def compilations() -> Iterator[list[str]]:
    """The names of the functions XLA compiles inside the block, in order (JAX's
    backend-compile events)."""
    names: list[str] = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            names.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
