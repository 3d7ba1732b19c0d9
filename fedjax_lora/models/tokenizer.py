"""Tokenizers for the base models: Hugging Face directories, hub ids and GGUF files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fedjax_lora.errors import one_line
from fedjax_lora.models.config import ModelConfig
from fedjax_lora.models.gguf import gguf_tokenizer, is_gguf
from fedjax_lora.models.weights import CheckpointError, _offline, looks_like_hub_id

__all__ = ["TokenizerMismatchError", "check_vocab", "load_tokenizer"]


class TokenizerMismatchError(CheckpointError):
    """The tokenizer can produce ids the model has no embedding for."""


def load_tokenizer(name_or_path: str | os.PathLike) -> Any:
    """A `transformers` tokenizer for an HF model directory, a hub id, or a `.gguf` file.

    Offline (`HF_HUB_OFFLINE=1`) a hub id is looked up in the local cache only.
    """
    path = Path(name_or_path).expanduser()
    if is_gguf(path):
        return gguf_tokenizer(path)
    from transformers import AutoTokenizer

    if path.is_dir():
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions on bad JSON
            raise CheckpointError(
                f"no usable tokenizer files in {path}: {type(e).__name__}: {one_line(e)}"
            ) from None
        # Without vocabulary files transformers still builds a tokenizer from config.json's
        # model type, one that maps every text to no tokens at all.
        if not tokenizer("a", add_special_tokens=False)["input_ids"]:
            raise CheckpointError(
                f"no usable tokenizer files in {path}: the tokenizer built there has no "
                "vocabulary (add tokenizer.json or vocab files)"
            )
        return tokenizer
    if path.exists() or not looks_like_hub_id(str(name_or_path)):
        raise CheckpointError(
            f"no tokenizer at {path}: pass an HF model directory, a hub id or a .gguf file"
        )
    offline = _offline()
    try:
        return AutoTokenizer.from_pretrained(str(name_or_path), local_files_only=offline)
    except Exception as e:
        how = "not in the local cache (offline)" if offline else "download failed"
        raise CheckpointError(
            f"cannot load the tokenizer of {str(name_or_path)!r}: {how} ({type(e).__name__}: {e})"
        ) from e


def _max_id(tokenizer: Any) -> int:
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    ids = list(vocab.values())
    for attr in ("all_special_ids",):
        ids.extend(i for i in getattr(tokenizer, attr, []) or [] if i is not None)
    if not ids:
        return len(tokenizer) - 1
    return max(max(ids), len(tokenizer) - 1)


def check_vocab(tokenizer: Any, config: ModelConfig) -> None:
    """Raises `TokenizerMismatchError` when the tokenizer has ids `>= config.vocab_size`.

    A model vocabulary larger than the tokenizer's (padded embedding tables) is fine.
    """
    top = _max_id(tokenizer)
    if top >= config.vocab_size:
        raise TokenizerMismatchError(
            f"tokenizer vocabulary does not fit the model: it has {len(tokenizer)} tokens (largest "
            f"id {top}) but the model's embedding has only vocab_size={config.vocab_size} rows; "
            "use the tokenizer that belongs to this model"
        )
