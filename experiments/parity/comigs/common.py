"""Shared pieces of the CoMiGS parity harness: importing the authors' PyTorch code from `REF_DIR`,
tiny GPT-2 base weights in Hugging Face format, and the name/layout mapping between the
reference's parameters and fedjax_lora's stacked client state.

Nothing of the reference is copied here: its modules are imported at run time from the exported
tree named by the environment variable `REF_DIR` (a `git archive` of `comigs-icml2025/codebase`
or `epfml/CoMiGS`).

Layouts (reference -> fedjax_lora):
- LoRA `lora_A [r, in]`, `lora_B [out, r]`  ->  `a [in, r]`, `b [r, out]` (transposes);
- expert e of a block: `mlp.experts.<e>.c_fc.lora_A`  ->  `mlp.experts.c_fc.a[e]`;
- router `mlp.per_token_router.weight [E, d]`  ->  `mlp.router.w [d, E]`;
- attention `attn.c_attn.lora_A`  ->  `attn.c_attn.lora.a`;
- base `nn.Linear.weight [out, in]` = HF `Conv1D.weight.T`.
"""

from __future__ import annotations

import json
import os
import re
import resource
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def out_dir() -> Path:
    """Where results go: `$OUT_DIR`, default `out/` next to this file."""
    d = Path(os.environ.get("OUT_DIR", HERE / "out"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------------------------------
# The reference


def ref_dir() -> Path:
    d = os.environ.get("REF_DIR")
    if not d:
        raise SystemExit(
            "set REF_DIR to an exported reference tree, e.g.\n"
            "  git -C <mirror of comigs-icml2025/codebase> archive HEAD | tar -x -C <dir>; "
            "REF_DIR=<dir>"
        )
    p = Path(d).expanduser().resolve()
    if not (p / "models" / "gating.py").exists():
        raise SystemExit(f"REF_DIR={d} does not hold the reference's models/gating.py")
    return p


def import_reference() -> types.SimpleNamespace:
    """The reference's modules, imported from `REF_DIR`.

    Two environment shims, no change to its code: `wandb` (imported at the top of
    `collab_utils/clients.py`, used only with `-wandb`) is a stub module, and
    `torch.cuda.synchronize` / `empty_cache` (called unconditionally at the end of
    `GeneralClient.train`) are no-ops on this CPU-only torch.
    """
    import torch

    d = str(ref_dir())
    if d not in sys.path:
        sys.path.insert(0, d)
    sys.modules.setdefault("wandb", types.ModuleType("wandb"))
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda *a, **k: None
    import collab_utils.aggregation_strategies as aggregation_strategies
    import collab_utils.clients as clients
    import collab_utils.collaboration_strategies as collaboration_strategies
    import collab_utils.server as server
    import models
    import models.gating as gating
    import models.lora as ref_lora
    import models.model as model

    return types.SimpleNamespace(
        models=models,
        model=model,
        gating=gating,
        lora=ref_lora,
        clients=clients,
        server=server,
        aggregation=aggregation_strategies,
        collaboration=collaboration_strategies,
        is_icml=hasattr(collaboration_strategies, "FedSaLoRACollaborationStrategy"),
    )


@dataclass(frozen=True)
class Tiny:
    """A GPT-2 shape shared by both sides."""

    vocab: int = 96
    d: int = 64
    layers: int = 2
    heads: int = 2
    positions: int = 64

    @property
    def d_ff(self) -> int:
        return 4 * self.d


def ref_config(ref, shape: Tiny, **over):
    """A reference `GPTConfig` for `shape` on CPU (bias, no dropout, per-token router)."""
    kw = dict(
        block_size=shape.positions,
        vocab_size=shape.vocab,
        n_layer=shape.layers,
        n_head=shape.heads,
        n_embd=shape.d,
        dropout=0.0,
        bias=True,
        device="cpu",
        lora_dropout=0.0,
        lora_alpha=16.0,
        is_per_token=True,
        is_no_router=False,
    )
    kw.update(over)
    return ref.model.GPTConfig(**kw)


# ---------------------------------------------------------------------------------------------
# Base weights


def random_gpt2_state(shape: Tiny, seed: int = 0) -> dict[str, np.ndarray]:
    """A random GPT-2 in Hugging Face layout (Conv1D weights `(in, out)`), f32. LayerNorm
    weights/biases and all biases are random too, so every base tensor is exercised."""
    rng = np.random.default_rng(seed)
    d, f = shape.d, shape.d_ff
    n = lambda *s, std=0.02: (rng.standard_normal(s) * std).astype(np.float32)
    sd = {
        "transformer.wte.weight": n(shape.vocab, d, std=0.3),
        "transformer.wpe.weight": n(shape.positions, d, std=0.1),
        "transformer.ln_f.weight": 1.0 + n(d, std=0.1),
        "transformer.ln_f.bias": n(d, std=0.05),
    }
    for layer in range(shape.layers):
        p = f"transformer.h.{layer}."
        sd.update(
            {
                p + "ln_1.weight": 1.0 + n(d, std=0.1),
                p + "ln_1.bias": n(d, std=0.05),
                p + "attn.c_attn.weight": n(d, 3 * d, std=0.1),
                p + "attn.c_attn.bias": n(3 * d, std=0.05),
                p + "attn.c_proj.weight": n(d, d, std=0.1),
                p + "attn.c_proj.bias": n(d, std=0.05),
                p + "ln_2.weight": 1.0 + n(d, std=0.1),
                p + "ln_2.bias": n(d, std=0.05),
                p + "mlp.c_fc.weight": n(d, f, std=0.1),
                p + "mlp.c_fc.bias": n(f, std=0.05),
                p + "mlp.c_proj.weight": n(f, d, std=0.1),
                p + "mlp.c_proj.bias": n(d, std=0.05),
            }
        )
    return sd


def save_hf_dir(path: Path, shape: Tiny, state: dict[str, np.ndarray]) -> Path:
    """An HF-format directory (`config.json` + `model.safetensors`) that
    `fedjax_lora.models.load` reads."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": shape.vocab,
        "n_embd": shape.d,
        "n_layer": shape.layers,
        "n_head": shape.heads,
        "n_positions": shape.positions,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": True,
    }
    (path / "config.json").write_text(json.dumps(config, indent=1))
    tensors = {k: np.ascontiguousarray(v) for k, v in state.items()}
    save_file(tensors, str(path / "model.safetensors"))
    return path


_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def load_base_into_ref(ref, model, state: dict[str, np.ndarray]) -> None:
    """Copies an HF-layout GPT-2 state into a reference `GPT` as its `from_pretrained` does
    (every expert gets the same base MLP via `GPT._transform_key`; Conv1D weights transposed;
    LoRA and router tensors untouched)."""
    import torch

    sd = model.state_dict()
    done = set()
    with torch.no_grad():
        for key in sd:
            if "lora" in key or "router" in key or key.endswith(".attn.bias") or "gate" in key:
                continue
            hf = ref.model.GPT._transform_key(key)
            if hf == "lm_head.weight":
                hf = "transformer.wte.weight"
            if hf not in state:
                raise KeyError(f"no base tensor for reference parameter {key}")
            value = state[hf].T if any(hf.endswith(w) for w in _CONV1D) else state[hf]
            sd[key].copy_(torch.from_numpy(np.ascontiguousarray(value)))
            done.add(hf)
    missing = set(state) - done
    if missing:
        raise KeyError(f"base tensors not used by the reference model: {sorted(missing)}")


# ---------------------------------------------------------------------------------------------
# Parameter mapping


_EXPERT = re.compile(r"^(.*\.mlp)\.experts\.(\d+)\.(c_fc|c_proj)\.lora_([AB])$")
_ATTN = re.compile(r"^(.*\.attn)\.(c_attn|c_proj)\.lora_([AB])$")
_ROUTER = re.compile(r"^(.*\.mlp)\.per_token_router\.weight$")


def ref_to_jax_name(name: str):
    """`(jax_path, expert_slot_or_None)` for a trainable reference parameter, else None."""
    m = _EXPERT.match(name)
    if m:
        return f"{m[1]}.experts.{m[3]}.{m[4].lower()}", int(m[2])
    m = _ATTN.match(name)
    if m:
        return f"{m[1]}.{m[2]}.lora.{m[3].lower()}", None
    m = _ROUTER.match(name)
    if m:
        return f"{m[1]}.router.w", None
    return None


def ref_trainables(model) -> dict[str, np.ndarray]:
    """`{ref_name: array}` of the LoRA and router tensors of a reference model."""
    return {
        k: v.detach().cpu().numpy().copy()
        for k, v in model.named_parameters()
        if ("lora" in k or "per_token_router" in k)
    }


def ref_to_jax_values(models_params: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stacked fedjax_lora values `{jax_path: [N, ...]}` from the clients' reference tensors."""
    per_path: dict[str, dict[int, dict[int | None, np.ndarray]]] = {}
    for i, params in enumerate(models_params):
        for name, value in params.items():
            hit = ref_to_jax_name(name)
            if hit is None:
                continue
            path, slot = hit
            per_path.setdefault(path, {}).setdefault(i, {})[slot] = value.T  # all transposed
    out = {}
    for path, clients in per_path.items():
        rows = []
        for i in range(len(models_params)):
            slots = clients[i]
            if None in slots:
                rows.append(slots[None])
            else:
                rows.append(np.stack([slots[e] for e in sorted(slots)]))
        out[path] = np.stack(rows)
    return out


def jax_flat(params) -> dict[str, np.ndarray]:
    """`{dotted_path: np.ndarray}` of an NNX state / pytree (NNX's trailing `value` dropped)."""
    import jax

    from fedjax_lora.aggregation.masks import path_names

    return {
        ".".join(path_names(p)): np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(params)
    }


def replace_jax_values(state, values: dict[str, np.ndarray]):
    """The NNX state with the leaves named in `values` replaced (shapes and dtypes checked)."""
    import jax.numpy as jnp
    from flax import nnx

    flat = []
    used = set()
    for path, var in nnx.to_flat_state(state):
        name = ".".join(str(p) for p in path)
        if name in values:
            old = var.get_value()
            new = np.asarray(values[name], dtype=old.dtype)
            if new.shape != old.shape:
                raise ValueError(f"{name}: shape {new.shape} != {old.shape}")
            var = var.replace(jnp.asarray(new))
            used.add(name)
        flat.append((path, var))
    unused = set(values) - used
    if unused:
        raise KeyError(f"not in the JAX state: {sorted(unused)}")
    return nnx.from_flat_state(flat)


def max_abs(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape {a.shape} != {b.shape}")
    return float(np.max(np.abs(a - b))) if a.size else 0.0
