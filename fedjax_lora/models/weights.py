"""Hugging Face checkpoints (config.json + safetensors) → NNX models, without torch.

`load_state_dict(model, state)` copies a Hugging Face state dict (`{hf_name: np.ndarray}` in the HF
layout) into a model built by `factory.build`: `nn.Linear.weight (out, in)` is transposed to our
`kernel (in, out)`, GPT-2's `Conv1D.weight` is already `(in, out)`; norms and embeddings keep
`weight`. Every model parameter must be filled exactly once; missing, unexpected or mis-shaped
tensors raise a `CheckpointError` naming them.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from fedjax_lora.errors import ModelFileError, one_line
from fedjax_lora.memory import check_fits, parameter_count
from fedjax_lora.models.config import ModelConfig
from fedjax_lora.models.factory import LanguageModel, build

__all__ = [
    "CheckpointError",
    "PICKLE_SUFFIXES",
    "hf_param_names",
    "load_hf",
    "load_hf_config",
    "load_state_dict",
    "read_safetensors",
    "resolve_hf",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Files fetched for a hub id: configs, weights, tokenizer files.
HUB_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer.model",
    "*.txt",
    "*.tiktoken",
]
# Non-parameter buffers some checkpoints carry: GPT-2's causal-mask `attn.bias`/`attn.masked_bias`,
# rotary `inv_freq`.
_IGNORED = re.compile(r"(^|\.)attn\.(bias|masked_bias)$|rotary_emb\.inv_freq$|\.inv_freq$")
# Backbone prefix as HF names it; bare checkpoints (e.g. the hub's `gpt2`) omit it.
_PREFIX = {"gpt2": "transformer.", "llama": "model."}


# A model checkpoint cannot be read or does not fit the model (the project's `ModelFileError`).
CheckpointError = ModelFileError


# ---------------------------------------------------------------------------------------------
# Name mapping


def _path_name(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


def hf_param_names(model: nnx.Module) -> dict[str, tuple[tuple[Any, ...], bool]]:
    """`{hf_name: (our_param_path, transpose)}` for every base parameter of the model.

    Our `...kernel` is HF's `...weight`; it is transposed at load except for GPT-2's `Conv1D`
    projections (everything under `transformer.` in a GPT-2 model), which HF stores `(in, out)`.
    """
    family = model.config.family
    names = {}
    for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        leaf = path[-1]
        hf = _path_name((*path[:-1], "weight" if leaf == "kernel" else leaf))
        transpose = leaf == "kernel" and not (family == "gpt2" and path[0] == "transformer")
        names[hf] = (tuple(path), transpose)
    return names


def _canonical(name: str, family: str, known: Mapping[str, Any]) -> str:
    """The model's name for a checkpoint tensor name (adds the backbone prefix when omitted)."""
    if name in known:
        return name
    prefixed = _PREFIX[family] + name
    return prefixed if prefixed in known else name


def load_state_dict(
    model: LanguageModel, state: Mapping[str, np.ndarray], *, source: str = "checkpoint"
) -> LanguageModel:
    """Copies an HF-named, HF-layout state dict into `model` (in place; also returned).

    Floating-point tensors are cast to each parameter's dtype; integer, boolean and non-finite
    tensors are refused. A tied head's `lm_head.weight` (equal to the embeddings) and known
    buffers are skipped. Raises `CheckpointError` listing missing, unexpected, mis-shaped,
    non-float and non-finite tensors.
    """
    cfg: ModelConfig = model.config
    names = hf_param_names(model)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    filled: dict[str, np.ndarray] = {}
    unexpected, mismatched, duplicated, not_float, not_finite = [], [], [], [], []
    tied_head = None
    for raw_name, array in state.items():
        if _IGNORED.search(raw_name):
            continue
        name = _canonical(raw_name, cfg.family, names)
        if name == "lm_head.weight" and cfg.tie_embeddings:
            tied_head = array
            continue
        if name not in names:
            unexpected.append(f"{raw_name} {tuple(array.shape)}")
            continue
        if name in filled:
            duplicated.append(raw_name)
            continue
        path, transpose = names[name]
        expected = tuple(flat[path].get_value().shape)
        value = np.asarray(array)
        if not np.issubdtype(value.dtype, np.floating) and value.dtype != ml_dtypes.bfloat16:
            not_float.append(f"{raw_name} ({value.dtype})")
            continue
        if not np.all(np.isfinite(value.astype(np.float32))):
            not_finite.append(raw_name)
            continue
        if transpose and value.ndim == 2:
            value = value.T
        if tuple(value.shape) != expected:
            hf_shape = expected[::-1] if transpose else expected
            mismatched.append(
                f"{raw_name}: checkpoint {tuple(array.shape)}, model expects {tuple(hf_shape)}"
            )
            continue
        filled[name] = value
    missing = sorted(set(names) - set(filled))
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_listing(mismatched)}")
    if duplicated:
        problems.append(f"tensors given twice ({len(duplicated)}): {_listing(duplicated)}")
    if not_float:
        problems.append(f"not floating point ({len(not_float)}): {_listing(not_float)}")
    if not_finite:
        problems.append(f"NaN or infinite values ({len(not_finite)}): {_listing(not_finite)}")
    embed = _PREFIX[cfg.family] + ("wte.weight" if cfg.family == "gpt2" else "embed_tokens.weight")
    if tied_head is not None and embed in filled and not np.array_equal(tied_head, filled[embed]):
        problems.append(
            "a distinct lm_head.weight although the config ties the head to the embeddings "
            "(tie_word_embeddings: true); set it to false or drop lm_head.weight"
        )
    if problems:
        raise CheckpointError(
            f"{source} does not fit the {cfg.family!r} model "
            f"(d_model={cfg.d_model}, n_layers={cfg.n_layers}, vocab={cfg.vocab_size}, "
            f"tied head={cfg.tie_embeddings}): " + "; ".join(problems)
        )
    for name, value in filled.items():
        var = flat[names[name][0]]
        dtype = var.get_value().dtype
        var.set_value(jnp.asarray(value.astype(dtype, copy=False)))
    return model


def _listing(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


# ---------------------------------------------------------------------------------------------
# Files


def _refuse_pickle(path: Path) -> None:
    raise CheckpointError(
        f"{path} is a pickle (PyTorch) checkpoint; fedjax_lora reads only safetensors (pickle "
        "files can execute code and need torch). Convert it once in an environment with torch: "
        "`from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained"
        "(src).save_pretrained(dst, safe_serialization=True)` (or `safetensors.torch.save_file"
        "(torch.load(path), 'model.safetensors')`), then load the new directory."
    )


_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _read_raw_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Parses the safetensors layout directly (8-byte header length, JSON header, raw buffer);
    used for dtypes `safetensors.numpy` cannot express (bf16 → `ml_dtypes.bfloat16`)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= size - 8:
            raise ModelFileError(f"{path}: header length {n} does not fit the file ({size} bytes)")
        header = json.loads(f.read(n))
    buffer = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, stop = info["data_offsets"]
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        shape = tuple(int(d) for d in info["shape"])
        if not 0 <= start <= stop <= buffer.size or stop - start != dtype.itemsize * math.prod(
            shape
        ):
            raise ModelFileError(
                f"{path}: tensor {name} has data offsets {[start, stop]} that do not match its "
                f"shape {shape} and dtype {info['dtype']} within {buffer.size} data bytes"
            )
        spans.append((start, stop, name))
        out[name] = np.asarray(buffer[start:stop]).view(dtype).reshape(shape)
    refuse_overlaps(spans, path)
    return out


def refuse_overlaps(spans: list[tuple[int, int, str]], path: Path | str) -> None:
    """Raises when two tensors' byte ranges `(start, stop, name)` overlap (aliased data)."""
    spans = sorted(s for s in spans if s[1] > s[0])
    for (_, stop, a), (start, _, b) in zip(spans, spans[1:], strict=False):
        if start < stop:
            raise ModelFileError(f"{path}: tensors {a} and {b} share bytes (aliased offsets)")


def load_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """One safetensors file as numpy arrays (`safetensors.numpy`; bf16 via `ml_dtypes`)."""
    from safetensors.numpy import load_file as st_load_file

    try:
        try:
            return dict(st_load_file(path))
        except TypeError:  # e.g. "data type 'bfloat16' not understood"
            return _read_raw_safetensors(Path(path))
    except ModelFileError:
        raise
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, JSON and layout errors
        raise ModelFileError(
            f"{path} is not a readable safetensors file ({type(e).__name__}: {one_line(e)}); "
            "re-download or re-export it"
        ) from None


def read_safetensors(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json`.

    bf16 tensors come back as `ml_dtypes.bfloat16` numpy arrays.
    """
    directory = Path(directory)
    single, index = directory / SAFETENSORS, directory / SAFETENSORS_INDEX
    if single.is_file():
        return dict(load_file(single))
    if index.is_file():
        return _read_sharded(index)
    others = sorted(directory.glob("*.safetensors"))
    if len(others) == 1:
        return dict(load_file(others[0]))
    pickles = sorted(p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        _refuse_pickle(pickles[0])
    raise CheckpointError(
        f"no weights in {directory}: expected {SAFETENSORS} or {SAFETENSORS_INDEX} "
        f"(found: {sorted(p.name for p in directory.iterdir())})"
    )


def _read_sharded(index: Path) -> dict[str, np.ndarray]:
    """The tensors of a sharded checkpoint as its index's `weight_map` lists them: every shard
    path inside the checkpoint directory, every listed tensor found in its shard, none in two
    shards; tensors a shard holds but the map does not list are refused too."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise TypeError("weight_map must map tensor names to shard file names")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ModelFileError(
            f"{index} is not a valid safetensors index ({type(e).__name__}: {one_line(e)}); it "
            'needs {"weight_map": {tensor name: shard file}}'
        ) from None
    root = index.parent.resolve()
    state: dict[str, np.ndarray] = {}
    where: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = (index.parent / shard).resolve()
        if Path(shard).is_absolute() or not shard_path.is_relative_to(root):
            raise ModelFileError(
                f"{index} lists shard {shard!r} outside the checkpoint directory {root}; shards "
                "must be files inside it (refused, nothing was read)"
            )
        if not shard_path.is_file():
            raise ModelFileError(f"shard {shard_path} listed in {index} does not exist")
        tensors = load_file(shard_path)
        listed = {name for name, s in weight_map.items() if s == shard}
        missing = sorted(listed - set(tensors))
        if missing:
            raise ModelFileError(
                f"{index} maps {_listing(missing)} to {shard}, which does not hold them"
            )
        for name in tensors:
            if name in where:
                raise ModelFileError(
                    f"tensor {name} is in two shards ({where[name]} and {shard}) of {index}"
                )
            if weight_map.get(name) != shard:
                raise ModelFileError(
                    f"shard {shard} holds tensor {name}, which {index} maps to "
                    f"{weight_map.get(name)!r}"
                )
            where[name] = shard
        state.update(tensors)
    return state


def load_hf_config(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """`(ModelConfig, raw config.json dict)` of a local HF model directory; a malformed file,
    a missing or mistyped field, or an impossible size raises `ModelFileError` naming it."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"missing {path}: a Hugging Face model directory needs config.json")
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise TypeError(f"the top level must be an object, got {type(raw).__name__}")
        config = ModelConfig.from_hf(raw)
        check_sizes(config)
    except KeyError as e:
        raise ModelFileError(f"{path} lacks the field {e}") from None
    except (ValueError, TypeError, AttributeError, ZeroDivisionError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path} is not a usable model config: {one_line(e)}") from None
    return config, raw


def check_sizes(config: ModelConfig) -> None:
    """Raises `ValueError` unless the parameters (float32) of `config` (whose sizes are positive
    integers, `ModelConfig`) fit the host's memory, before anything is allocated."""
    check_fits("the base's parameters", 4 * parameter_count(config), "model sizes")


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(getattr(constants, "HF_HUB_OFFLINE", False))


def looks_like_hub_id(name: str) -> bool:
    """`org/name` or `name`, without a local file-system meaning."""
    return (
        re.fullmatch(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?", name) is not None
        and not name.endswith((".gguf", ".safetensors", ".json") + PICKLE_SUFFIXES)
        and not name.startswith((".", "/", "~"))
    )


def resolve_hf(name_or_path: str | os.PathLike) -> Path:
    """A local directory for a local path or a hub id (fetched, or taken from the cache offline)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix in PICKLE_SUFFIXES:
                _refuse_pickle(path)
            raise CheckpointError(
                f"{path} is a file; pass a Hugging Face model directory (config.json + "
                "model.safetensors), a hub id, or a .gguf file"
            )
        return path
    name = str(name_or_path)
    if not looks_like_hub_id(name):
        raise CheckpointError(f"no such file or directory: {path}")
    from huggingface_hub import snapshot_download

    offline = _offline()
    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS, local_files_only=offline))
    except Exception as e:  # network, auth, cache misses
        how = (
            "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"
            if offline
            else "downloading it failed"
        )
        raise CheckpointError(
            f"{name!r} is neither a local path nor an available hub model: {how} "
            f"({type(e).__name__}: {e}). Pass a local directory with config.json and "
            "model.safetensors, or a .gguf file."
        ) from e


def load_hf(
    name_or_path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    config_overrides: dict[str, Any] | None = None,
) -> LanguageModel:
    """An NNX model from a local HF directory or a hub id, weights cast to `dtype`."""
    directory = resolve_hf(name_or_path)
    cfg, _ = load_hf_config(directory)
    cfg = cfg.replace(**(config_overrides or {}))
    state = read_safetensors(directory)
    model = build(cfg, dtype=dtype)
    return load_state_dict(model, state, source=str(directory))
