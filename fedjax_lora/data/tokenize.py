"""Tokenization of texts with a Hugging Face tokenizer into flat token streams.

Accepts either a `transformers` tokenizer (anything with `__call__`/`eos_token_id`, e.g.
`PreTrainedTokenizerBase`) or a `tokenizers.Tokenizer`. Every produced id is checked against the
model's vocabulary size, so a tokenizer that does not belong to the model fails loudly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from fedjax_lora.data.streams import MaskedStream

Separator = Literal["eos", "space", "none"]

# Names under which a bare `tokenizers.Tokenizer` usually stores its end-of-text token.
_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")


def _is_hf_tokenizers(tokenizer: Any) -> bool:
    return hasattr(tokenizer, "encode_batch") and hasattr(tokenizer, "token_to_id")


def encode_batch(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (no BOS/EOS added)."""
    texts = list(texts)
    if not texts:
        return []
    if _is_hf_tokenizers(tokenizer):
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    return list(tokenizer(texts, add_special_tokens=False)["input_ids"])


def eos_token_id(tokenizer: Any) -> int:
    """The tokenizer's end-of-sequence id; raises if it has none."""
    if _is_hf_tokenizers(tokenizer):
        for name in _EOS_NAMES:
            idx = tokenizer.token_to_id(name)
            if idx is not None:
                return int(idx)
    elif getattr(tokenizer, "eos_token_id", None) is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError(
        f"tokenizer {type(tokenizer).__name__} has no EOS token (looked for {_EOS_NAMES}); "
        "pass eos_id= explicitly"
    )


def check_vocab(ids: np.ndarray, vocab_size: int, what: str = "token stream") -> None:
    """Raise if any id is negative or >= `vocab_size` (tokenizer/model vocabulary mismatch)."""
    ids = np.asarray(ids)
    if ids.size == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = hi if hi >= vocab_size else lo
        raise ValueError(
            f"vocabulary mismatch: {what} contains id {bad}, outside the model's vocabulary "
            f"[0, {vocab_size}); use the tokenizer that belongs to the model (or a model whose "
            "vocab_size covers this tokenizer)"
        )


def tokenize_texts(
    texts: Sequence[str],
    tokenizer: Any,
    *,
    vocab_size: int,
    separator: Separator = "eos",
    eos_id: int | None = None,
) -> np.ndarray:
    """Tokenize documents into one int32 stream.

    `separator`: `"eos"` appends the EOS id after every document; `"space"` tokenizes the
    documents joined by a single space as one text (the trust-weighted reference code's
    `" ".join(texts)`, no EOS); `"none"` concatenates the documents' ids directly. `vocab_size` is
    the *model's* vocabulary size; every id must be below it.
    """
    if separator == "space":
        ids = encode_batch(tokenizer, [" ".join(texts)]) if texts else []
        stream = np.asarray(ids[0] if ids else [], dtype=np.int32)
    else:
        docs = encode_batch(tokenizer, texts)
        if separator == "eos":
            eos = eos_token_id(tokenizer) if eos_id is None else eos_id
            docs = [[*d, eos] for d in docs]
        elif separator != "none":
            raise ValueError(f"separator must be 'eos', 'space' or 'none', got {separator!r}")
        stream = np.fromiter((t for d in docs for t in d), dtype=np.int32)
    check_vocab(stream, vocab_size)
    return stream


def _prompt_target_ids(
    prompts: Sequence[str],
    targets: Sequence[str],
    tokenizer: Any,
    eos_id: int | None,
    bos_id: int | None,
) -> tuple[list[tuple[list[int], int]], int]:
    """`([(ids, prompt_length), ...], eos)`: every example as `[bos] prompt target eos`, the
    prompt and target tokenized separately (as the FedAMoLE reference does)."""
    if len(prompts) != len(targets):
        raise ValueError(f"got {len(prompts)} prompts but {len(targets)} targets")
    eos = eos_token_id(tokenizer) if eos_id is None else eos_id
    head = [] if bos_id is None else [bos_id]
    pairs = zip(encode_batch(tokenizer, prompts), encode_batch(tokenizer, targets), strict=True)
    return [(head + p + t + [eos], len(head) + len(p)) for p, t in pairs], eos


def tokenize_prompt_target(
    prompts: Sequence[str],
    targets: Sequence[str],
    tokenizer: Any,
    *,
    vocab_size: int,
    eos_id: int | None = None,
    bos_id: int | None = None,
) -> MaskedStream:
    """Tokenize (prompt, target) examples into one stream with a target mask.

    Each example becomes `[bos] prompt target eos`; the prompt and target are tokenized separately
    (as the FedAMoLE reference does), and the mask is 1 on the target tokens and the EOS only, so
    the loss counts the response, not the prompt.
    """
    examples, _ = _prompt_target_ids(prompts, targets, tokenizer, eos_id, bos_id)
    stream = np.asarray([t for ids, _ in examples for t in ids], dtype=np.int32)
    mask = [m for ids, n in examples for m in [0] * n + [1] * (len(ids) - n)]
    check_vocab(stream, vocab_size)
    return MaskedStream(stream, np.asarray(mask, dtype=np.uint8))


def tokenize_example_rows(
    prompts: Sequence[str],
    targets: Sequence[str],
    tokenizer: Any,
    *,
    vocab_size: int,
    max_length: int,
    eos_id: int | None = None,
    bos_id: int | None = None,
    targets_only: bool = True,
) -> tuple[MaskedStream, np.ndarray]:
    """(prompt, target) examples as one right-padded example per slot of `max_length + 1` tokens,
    as FedAMoLE's reference preprocesses them (`data/preprocess.py::CausalLMPreprocessor`, then
    `ClientDataLoader`'s filter):

    - an example is `[bos] prompt target eos` (prompt and target tokenized separately);
    - an example whose `[bos] prompt` has `>= max_length` tokens is dropped;
    - the rest are cut to `max_length` tokens and their last token is set to EOS (a no-op unless
      cut);
    - each fills a slot of `max_length + 1` tokens, the rest of the slot EOS-padded with mask 0,
      so a window of `max_length + 1` tokens at a slot start is exactly that example.

    The mask is 1 on the target tokens and the final EOS (`targets_only`), or on every token of
    the example (FedAMoLE's RSEA statistics count prompt and response). Returns the slotted
    stream and the indices of the kept examples."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 tokens, got {max_length}")
    examples, eos = _prompt_target_ids(prompts, targets, tokenizer, eos_id, bos_id)
    kept = np.asarray([i for i, (_, n) in enumerate(examples) if n < max_length], np.int64)
    slot = max_length + 1
    tokens = np.full((len(kept), slot), eos, np.int32)
    mask = np.zeros((len(kept), slot), np.uint8)
    for row, i in enumerate(kept):
        ids, n = examples[i]
        ids = ids[:max_length]
        ids[-1] = eos
        tokens[row, : len(ids)] = ids
        mask[row, (n if targets_only else 0) : len(ids)] = 1
    check_vocab(tokens, vocab_size)
    return MaskedStream(tokens.reshape(-1), mask.reshape(-1)), kept
