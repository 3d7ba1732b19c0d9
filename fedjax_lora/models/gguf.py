"""llama.cpp GGUF files → `ModelConfig`, HF-named state dicts, NNX models and tokenizers.

Weights are dequantized with `gguf.quants.dequantize` (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_x and
the K-quants), renamed from llama.cpp names (`blk.N.attn_q`, ...) to Hugging Face names in the HF
layout, and then loaded by `weights.load_state_dict`. llama.cpp's `convert_hf_to_gguf.py` permutes
the rows of q and k of `llama`-architecture models for its interleaved RoPE; that permutation is
inverted here so our half-split (`rotate_half`) RoPE gives the same model.

Supported GGUF architectures: `llama` (Llama, SmolLM, Mistral-style), `qwen2`, `gpt2`.
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from fedjax_lora.errors import one_line
from fedjax_lora.models.config import ModelConfig
from fedjax_lora.models.factory import LanguageModel, build
from fedjax_lora.models.weights import (
    CheckpointError,
    check_sizes,
    load_state_dict,
    refuse_overlaps,
)

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "gguf_config",
    "gguf_state_dict",
    "gguf_tokenizer",
    "is_gguf",
    "load_gguf",
    "read_gguf",
    "unpermute_qk",
]

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gpt2")

_LLAMA_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LLAMA_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GPT2_NAMES = {
    "token_embd.weight": "transformer.wte.weight",
    "position_embd.weight": "transformer.wpe.weight",
    "output_norm.weight": "transformer.ln_f.weight",
    "output_norm.bias": "transformer.ln_f.bias",
    "output.weight": "lm_head.weight",
}
_GPT2_BLOCK = {
    "attn_norm": "ln_1",
    "ffn_norm": "ln_2",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")

# llama.cpp pre-tokenizer names → (split regex or None, split digits individually).
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS = {
    "default": (None, False),
    "gpt-2": (None, False),
    "gpt2": (None, False),
    "smollm": (None, True),
    "llama-bpe": (_LLAMA3_REGEX, False),
    "llama3": (_LLAMA3_REGEX, False),
    "qwen2": (_QWEN2_REGEX, False),
}


# ---------------------------------------------------------------------------------------------
# Reading


@functools.lru_cache(maxsize=2)
def _reader(path: str, _mtime: float, _size: int):
    import gguf

    return gguf.GGUFReader(path)


def read_gguf(path: str | os.PathLike):
    """A (cached) `gguf.GGUFReader` for `path`; clear errors for missing or non-GGUF files."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"no such GGUF file: {path}")
    stat = path.stat()
    try:
        return _reader(str(path.resolve()), stat.st_mtime, stat.st_size)
    except Exception as e:  # noqa: BLE001 - the reader raises IndexError, struct errors, ...
        raise CheckpointError(
            f"{path} is not a readable GGUF file (truncated or with inconsistent counts: "
            f"{type(e).__name__}: {one_line(e)})"
        ) from None


def is_gguf(path: str | os.PathLike) -> bool:
    """A `.gguf` name, or a file starting with the GGUF magic."""
    path = Path(path).expanduser()
    if path.suffix == ".gguf":
        return True
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _meta(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _require(reader, key: str) -> Any:
    value = _meta(reader, key)
    if value is None:
        raise CheckpointError(f"GGUF metadata lacks {key!r}")
    return value


def _architecture(reader) -> str:
    arch = _require(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"unsupported GGUF architecture {arch!r}; supported: {list(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def _tensor_shapes(reader) -> dict[str, tuple[int, ...]]:
    """numpy-order shapes (llama.cpp's `ne` reversed), i.e. HF `(out, in)` for projections."""
    return {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}


def gguf_config(path_or_reader) -> ModelConfig:
    """The model configuration from GGUF metadata (`{arch}.*` keys) and tensor shapes."""
    reader = _as_reader(path_or_reader)
    arch = _architecture(reader)
    shapes = _tensor_shapes(reader)
    if "token_embd.weight" not in shapes:
        raise CheckpointError("GGUF file has no token_embd.weight tensor")
    vocab, d_model = shapes["token_embd.weight"]

    def key(name, default=None):
        value = _meta(reader, f"{arch}.{name}", default)
        if isinstance(value, list):  # per-layer arrays: require them uniform
            if len(set(value)) != 1:
                raise CheckpointError(f"per-layer {arch}.{name}={value} is not supported")
            value = value[0]
        return value

    n_heads = int(key("attention.head_count"))
    common = dict(
        vocab_size=vocab,
        d_model=d_model,
        n_layers=int(key("block_count")),
        n_heads=n_heads,
        d_ff=int(key("feed_forward_length")),
        max_positions=int(key("context_length", 2048)),
        tie_embeddings="output.weight" not in shapes,
        bos_token_id=_meta(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_meta(reader, "tokenizer.ggml.eos_token_id"),
    )
    if arch == "gpt2":
        return ModelConfig(
            family="gpt2",
            norm_eps=float(key("attention.layer_norm_epsilon", 1e-5)),
            activation="gelu_tanh",
            qkv_bias=True,
            **common,
        )
    head_dim = int(key("attention.key_length", d_model // n_heads))
    rot = key("rope.dimension_count")
    if rot is not None and int(rot) != head_dim:
        raise CheckpointError(f"partial rotary embeddings ({rot} of {head_dim}) are not supported")
    if "rope_freqs.weight" in shapes:
        raise CheckpointError(
            "this GGUF stores Llama-3 RoPE scaling as a rope_freqs tensor, which is not supported "
            "yet; load the Hugging Face safetensors checkpoint instead"
        )
    rope_scaling = None
    kind = key("rope.scaling.type")
    if kind not in (None, "none"):
        if kind != "linear":
            raise CheckpointError(f"unsupported GGUF rope scaling {kind!r}; supported: 'linear'")
        rope_scaling = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    n_kv = key("attention.head_count_kv")
    return ModelConfig(
        family="llama",
        n_kv_heads=int(n_kv) if n_kv is not None else None,
        head_dim=head_dim if head_dim * n_heads != d_model else None,
        norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        activation="silu",
        qkv_bias=arch == "qwen2" or "blk.0.attn_q.bias" in shapes,
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        **common,
    )


def _as_reader(path_or_reader):
    if isinstance(path_or_reader, (str, os.PathLike)):
        return read_gguf(path_or_reader)
    return path_or_reader


def _dequantize(tensor) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants

    kind = tensor.tensor_type
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    if kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        out = np.asarray(tensor.data, dtype=np.float32)
    else:
        try:
            out = quants.dequantize(tensor.data, kind)
        except NotImplementedError as e:
            raise CheckpointError(
                f"cannot dequantize {tensor.name} of type {kind.name}: {e}"
            ) from e
    return out.reshape(shape).astype(np.float32, copy=False)


def unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's `permute` of q/k rows (interleaved → half-split RoPE).

    llama.cpp reorders each head's rows from `[first half, second half]` to interleaved pairs:
    `w.reshape(H, 2, Dh/2, ...).swapaxes(1, 2)`; this undoes it. Works on weights `(H·Dh, in)` and
    biases `(H·Dh,)`.
    """
    rows = weight.shape[0]
    return (
        weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def gguf_state_dict(path_or_reader) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """`(config, {hf_name: f32 array in HF layout})` of a GGUF file."""
    reader = _as_reader(path_or_reader)
    arch = _architecture(reader)
    cfg = gguf_config(reader)
    top, block, prefix = (
        (_GPT2_NAMES, _GPT2_BLOCK, "transformer.h")
        if arch == "gpt2"
        else (_LLAMA_NAMES, _LLAMA_BLOCK, "model.layers")
    )
    state: dict[str, np.ndarray] = {}
    unknown = []
    for tensor in reader.tensors:
        name = tensor.name
        m = _BLOCK.fullmatch(name)
        if name in top:
            hf = top[name]
        elif m and m.group(2) in block:
            layer, part, kind = m.groups()
            hf = f"{prefix}.{layer}.{block[part]}.{kind}"
        else:
            unknown.append(name)
            continue
        value = _dequantize(tensor)
        if arch == "llama" and m and m.group(2) in ("attn_q", "attn_k"):
            heads = cfg.n_heads if m.group(2) == "attn_q" else cfg.num_kv_heads
            value = unpermute_qk(value, heads)
        if arch == "gpt2" and m and value.ndim == 2:
            value = value.T  # GPT-2 Conv1D weights are (in, out) in HF; GGUF stores (out, in)
        state[hf] = value
    if unknown:
        raise CheckpointError(
            f"GGUF tensors with no counterpart in the {arch!r} model: {unknown[:12]}"
        )
    return cfg, state


def _check_layout(reader, path: Any) -> None:
    """Raises unless every tensor's bytes lie inside the file, match its type and shape, and
    overlap no other tensor's (a retyped, shifted or aliased tensor)."""
    from gguf import GGML_QUANT_SIZES

    spans, size = [], len(reader.data)
    for t in reader.tensors:
        block, type_size = GGML_QUANT_SIZES[t.tensor_type]
        n = int(np.prod([int(d) for d in t.shape.tolist()]))
        start, nbytes = int(t.data_offset), int(t.n_bytes)
        if n % block or nbytes != n // block * type_size or start + nbytes > size:
            raise CheckpointError(
                f"{path}: tensor {t.name} ({t.tensor_type.name}, {n} values) does not fit its "
                f"{nbytes} bytes at offset {start} of {size}"
            )
        spans.append((start, start + nbytes, t.name))
    refuse_overlaps(spans, path)


def load_gguf(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    config_overrides: dict[str, Any] | None = None,
) -> LanguageModel:
    """An NNX model with the dequantized weights of a GGUF file, cast to `dtype`; a malformed
    file raises `CheckpointError` naming it."""
    try:
        reader = read_gguf(path)
        _check_layout(reader, path)
        cfg, state = gguf_state_dict(reader)
        check_sizes(cfg)
    except CheckpointError as e:
        if str(path) in str(e):
            raise
        raise CheckpointError(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - lying counts, types or metadata in the file
        raise CheckpointError(
            f"{path} is not a usable GGUF file ({type(e).__name__}: {one_line(e)})"
        ) from None
    cfg = cfg.replace(**(config_overrides or {}))
    return load_state_dict(build(cfg, dtype=dtype), state, source=str(path))


# ---------------------------------------------------------------------------------------------
# Tokenizer


def gguf_tokenizer(path_or_reader):
    """A `transformers.PreTrainedTokenizerFast` (byte-level BPE) built from GGUF metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    reader = _as_reader(path_or_reader)
    kind = _meta(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(
            f"GGUF tokenizer model {kind!r} is not supported; only byte-level BPE ('gpt2')"
        )
    tokens: list[str] = _require(reader, "tokenizer.ggml.tokens")
    merges: list[str] = _require(reader, "tokenizer.ggml.merges")
    types = _meta(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))

    pre = _meta(reader, "tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        warnings.warn(
            f"unknown GGUF pre-tokenizer {pre!r}; using GPT-2's byte-level split", stacklevel=2
        )
    regex, digits = _PRE_TOKENIZERS.get(pre, (None, False))
    steps = []
    if digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if regex is not None:
        from tokenizers import Regex

        steps.append(pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=regex is None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps) if len(steps) > 1 else steps[0]
    tok.decoder = decoders.ByteLevel()

    # CONTROL (3) and USER_DEFINED (4) tokens are matched whole, before BPE.
    specials = [tokens[i] for i, t in enumerate(types) if t == 3]
    user = [tokens[i] for i, t in enumerate(types) if t == 4]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    if user:
        tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in user])

    def token(key):
        i = _meta(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos = token("bos")
    if _meta(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    kwargs = {
        name: value
        for name, value in (
            ("bos_token", bos),
            ("eos_token", token("eos")),
            ("unk_token", token("unknown")),
            ("pad_token", token("padding")),
        )
        if value is not None
    }
    chat = _meta(reader, "tokenizer.chat_template")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    if chat:
        fast.chat_template = chat
    return fast
