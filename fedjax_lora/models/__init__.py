"""Base language models: configs, NNX model families, checkpoint and tokenizer loading.

`load(name_or_path)` accepts a local Hugging Face directory (config.json + safetensors), a hub id,
or a llama.cpp `.gguf` file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from fedjax_lora.models.config import HF_MODEL_TYPES, ModelConfig
from fedjax_lora.models.factory import LanguageModel, build, from_config
from fedjax_lora.models.generate import generate
from fedjax_lora.models.gguf import is_gguf, load_gguf
from fedjax_lora.models.tokenizer import TokenizerMismatchError, check_vocab, load_tokenizer
from fedjax_lora.models.weights import CheckpointError, load_hf, load_state_dict

__all__ = [
    "HF_MODEL_TYPES",
    "CheckpointError",
    "LanguageModel",
    "ModelConfig",
    "TokenizerMismatchError",
    "build",
    "check_vocab",
    "from_config",
    "generate",
    "load",
    "load_state_dict",
    "load_tokenizer",
]


def load(
    name_or_path: str | os.PathLike, dtype: Any = jnp.float32, **config_overrides: Any
) -> LanguageModel:
    """A pretrained model as an NNX module, weights (`nnx.Param`) cast to `dtype`.

    `config_overrides` replace `ModelConfig` fields that do not change the weights' shapes, e.g.
    `activation="gelu_erf"` (the trust-weighted reference's exact GELU), `dropout=0.2`,
    `attn_dropout=0.2` (dropout is active only when the model is called with `rngs`).

    `name_or_path`: a local HF model directory, a hub id (downloaded unless `HF_HUB_OFFLINE=1`,
    then taken from the cache), or a `.gguf` file. Supported HF `model_type`s: see
    `HF_MODEL_TYPES`; supported GGUF architectures: `gguf.SUPPORTED_ARCHITECTURES`.
    """
    path = Path(name_or_path).expanduser()
    if is_gguf(path):
        return load_gguf(path, dtype=dtype, config_overrides=config_overrides)
    return load_hf(name_or_path, dtype=dtype, config_overrides=config_overrides)
