"""Construction of base models from a `ModelConfig`, with random initialisation."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedjax_lora.families import family
from fedjax_lora.models.causal_lm import CausalLM
from fedjax_lora.models.config import ModelConfig

LanguageModel = CausalLM


def build(cfg: ModelConfig, *, dtype: Any = jnp.float32) -> LanguageModel:
    """An uninitialised (zero/one-filled) model of the config's family."""
    return family(cfg.family).model()(cfg, dtype=dtype)


def from_config(
    cfg: ModelConfig, *, dtype: Any = jnp.float32, seed: int = 0, std: float = 0.02
) -> LanguageModel:
    """A randomly initialised model: kernels and embeddings ~ N(0, std²) (GPT-2's init), biases 0,
    norm weights 1."""
    model = build(cfg, dtype=dtype)
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        if path[-1] == "kernel" or (path[-1] == "weight" and value.ndim == 2):
            var.set_value((std * rng.standard_normal(value.shape)).astype(value.dtype))
    to_device(model)
    return model


def to_device(model: nnx.Module) -> None:
    """Moves every host (NumPy) array of the model to the default device in one transfer."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state))
