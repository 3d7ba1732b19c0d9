"""The project's error types: one line naming the field or file and the fix.

Every error the project raises for bad input is a `FedjaxLoraError` (a `ValueError`, so callers
catching `ValueError` keep working); the CLI prints it as `fedjax-lora: error: <message>` and
exits with status 2. This module imports nothing heavy (no JAX), so the CLI can validate before
importing JAX.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DivergenceError",
    "FedjaxLoraError",
    "ModelFileError",
    "one_line",
]


class FedjaxLoraError(ValueError):
    """Bad input or an unusable run, described in one line."""


class ConfigError(FedjaxLoraError):
    """An experiment config value is out of range, of the wrong type, or conflicts with another;
    also a `--resume` whose config differs from the run it continues."""


class ModelFileError(FedjaxLoraError):
    """A model file (safetensors, sharded index, GGUF, config.json, tokenizer) cannot be read or
    does not fit the model."""


class CheckpointError(FedjaxLoraError):
    """A simulation checkpoint cannot be used: unreadable, corrupt, of another configuration, or
    missing when `--resume` asks for one."""


class DataError(FedjaxLoraError):
    """Text or token data cannot be read or does not fit the model (encoding, vocabulary,
    missing fields)."""


class DivergenceError(FedjaxLoraError, FloatingPointError):
    """Training diverged: a non-finite value, or a loss above the uniform prediction's."""


def one_line(error: BaseException) -> str:
    """An error's message on one line (YAML, OS and parser errors may span several)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__
