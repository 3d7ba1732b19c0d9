"""Shared pieces of the trust-weighted parity harness: one tiny GPT-2 base written as a Hugging
Face safetensors directory and loaded by both sides, LoRA adapters copied between them, and
batch injection into the reference's `get_batch`.

Conventions: the reference's LoRA tensors are `...lora_A (in, r)` / `...lora_B (r, out)`;
fedjax_lora's are `...lora.a (in, r)` / `...lora.b (r, out)`, stacked on a leading client axis.
"""

from __future__ import annotations

import json
import resource
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@dataclass(frozen=True)
class TinyGPT2:
    vocab: int = 256
    d: int = 64
    layers: int = 2
    heads: int = 4
    positions: int = 32
    seed: int = 0


def write_tiny_gpt2(out_dir: str | Path, cfg: TinyGPT2) -> Path:
    """A randomly initialised GPT-2 (transformers' own init) saved as `config.json` +
    `model.safetensors`; exact-erf GELU (`activation_function: gelu`, the reference's `nn.GELU`)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out = Path(out_dir)
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        hf = json.loads((out / "config.json").read_text())
        if (hf["n_embd"], hf["n_layer"], hf["vocab_size"], hf["n_positions"], hf.get("seed")) == (
            cfg.d,
            cfg.layers,
            cfg.vocab,
            cfg.positions,
            cfg.seed,
        ):
            return out
    torch.manual_seed(cfg.seed)
    hf_cfg = GPT2Config(
        vocab_size=cfg.vocab,
        n_positions=cfg.positions,
        n_embd=cfg.d,
        n_layer=cfg.layers,
        n_head=cfg.heads,
        activation_function="gelu",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(hf_cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    hf = json.loads((out / "config.json").read_text())
    hf["seed"] = cfg.seed
    (out / "config.json").write_text(json.dumps(hf, indent=1))
    return out


# ---------------------------------------------------------------------------------------------
# Reference side


def ref_model_from_hf(
    REF,
    hf_dir: str | Path,
    *,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
    dropout: float = 0.0,
    sequence_length: int | None = None,
):
    """The reference's `GPTLoRA` with the HF checkpoint loaded the way its `from_pretrained`
    does (Conv1D weights of c_attn/c_proj/c_fc transposed to nn.Linear layout, LoRA tensors kept
    from the module), LoRA on attention and MLP, everything else frozen (`--lora_mlp
    --lora_causal_self_attention --lora_freeze_all_non_lora`). Dropout 0 by default so both
    sides are deterministic."""
    from safetensors.torch import load_file

    hf = json.loads((Path(hf_dir) / "config.json").read_text())
    args = Namespace(
        vocab_size=hf["vocab_size"],
        sequence_length=sequence_length or hf["n_positions"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        bias=True,
        dropout=dropout,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        lora_mlp=True,
        lora_causal_self_attention=True,
        lora_freeze_all_non_lora=True,
        lora_allow_embedding=False,
    )
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        model = REF.models.GPTLoRA(args)
    sd_hf = load_file(str(Path(hf_dir) / "model.safetensors"))
    own = model.state_dict()
    sd = {}
    for key, value in sd_hf.items():
        if any(key.endswith(k) for k in ("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            value = value.T
        if key in own:
            sd[key] = value
    if "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    for name, param in model.named_parameters():
        if "lora" in name:
            sd[name] = param
    if (
        "transformer.wpe.weight" in sd
        and sd["transformer.wpe.weight"].shape[0] != args.sequence_length
    ):
        sd["transformer.wpe.weight"] = sd["transformer.wpe.weight"][: args.sequence_length]
    missing = set(own) - set(sd)
    if missing:
        raise RuntimeError(
            f"reference model keys not filled from the checkpoint: {sorted(missing)}"
        )
    model.load_state_dict(sd)
    return model


def ref_clients(REF, models, *, lr, iterations, pct_start, betas=(0.9, 0.95), wd=1e-3):
    """`[model, AdamW, OneCycleLR]` per client, built as the reference's `main.py` does
    (parameter groups from `get_parameter_group_specs`, unfused AdamW on CPU)."""
    torch = REF.torch
    clients = []
    for model in models:
        group_specs = model.get_parameter_group_specs()
        by_name = dict(model.named_parameters())
        for g in group_specs:
            g["params"] = [by_name[n] for n in g["params"]]
        opt = torch.optim.AdamW(group_specs, lr=lr, betas=betas, weight_decay=wd)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            optimizer=opt,
            max_lr=lr,
            total_steps=iterations,
            pct_start=pct_start,
            anneal_strategy="cos",
            cycle_momentum=False,
            div_factor=1e2,
            final_div_factor=0.05,
        )
        clients.append([model, opt, sched])
    return clients


def ref_lora_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def ref_adapters(models) -> dict[str, np.ndarray]:
    """`{ref_name: float32 [N, ...]}` of the trainable (LoRA) tensors of every client."""
    names = ref_lora_names(models[0])
    out = {}
    for name in names:
        out[name] = np.stack(
            [dict(m.named_parameters())[name].detach().cpu().numpy() for m in models]
        )
    return out


# ---------------------------------------------------------------------------------------------
# fedjax_lora side


def jax_model_from_hf(hf_dir: str | Path, *, rank: int, alpha: float, lora_dropout: float = 0.0):
    """fedjax_lora's GPT-2 from the same directory, LoRA as in the paper (alpha/r scaling,
    `kaiming_uniform` with fan = r, i.e. A ~ U(±1/sqrt(r)), B = 0) on the four projections."""
    from fedjax_lora import lora, models

    model = models.load(str(hf_dir))
    lora.add_lora(
        model,
        lora.LoRAConfig(
            targets=LORA_TARGETS,
            rank=rank,
            alpha=alpha,
            scaling="alpha/r",
            dropout=lora_dropout,
            init="kaiming_uniform",
            init_fan="rank",
        ),
    )
    return model


def jax_path_to_ref(path: tuple[Any, ...]) -> str:
    *prefix, slot, ab = (str(p) for p in path)
    if slot != "lora" or ab not in ("a", "b"):
        raise ValueError(f"unexpected adapter path {path}")
    return ".".join(prefix) + (".lora_A" if ab == "a" else ".lora_B")


def jax_adapters(stacked) -> dict[str, np.ndarray]:
    """`{ref_name: float32 [N, ...]}` of a stacked fedjax_lora adapter state."""
    from flax import nnx

    out = {}
    for path, var in nnx.to_flat_state(stacked):
        value = var.get_value() if hasattr(var, "get_value") else var
        out[jax_path_to_ref(path)] = np.asarray(value, np.float32)
    return out


def stacked_from_ref_names(template, arrays: dict[str, np.ndarray]):
    """A stacked fedjax_lora adapter state (`template`'s structure) filled from
    `{ref_name: [N, ...]}`."""
    import jax.numpy as jnp
    from flax import nnx

    flat = []
    for path, var in nnx.to_flat_state(template):
        flat.append((path, var.replace(jnp.asarray(arrays[jax_path_to_ref(path)]))))
    return nnx.from_flat_state(flat)


def copy_adapters_to_ref(arrays: dict[str, np.ndarray], models) -> None:
    """Overwrites every reference client's LoRA tensors with `arrays[name][i]`."""
    import torch

    for i, model in enumerate(models):
        params = dict(model.named_parameters())
        for name, value in arrays.items():
            with torch.no_grad():
                params[name].copy_(torch.from_numpy(np.ascontiguousarray(value[i])))


def max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    if set(a) != set(b):
        raise ValueError(f"tensor names differ: {sorted(set(a) ^ set(b))[:6]}")
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


# ---------------------------------------------------------------------------------------------
# Batch injection


class Feeder:
    """Replaces the reference's `get_batch` (in `optim.utils`, `optim.lora` and, on HEAD,
    `optim.strategies`) by a lookup: every data array handed to the reference is registered with
    a provider `k -> (x int64 [B, T], y int64 [B, T])`, `k` counting that array's calls. The rest
    of the reference (training loop, `eval`, trust rules) runs unchanged."""

    def __init__(self, REF):
        self.REF = REF
        self._entries: dict[int, list] = {}
        self._orig = {}
        for mod in (REF.utils, REF.lora, REF.strategies):
            if mod is not None and hasattr(mod, "get_batch"):
                self._orig[mod] = mod.get_batch
                mod.get_batch = self.get_batch

    def register(self, array: np.ndarray, provider) -> np.ndarray:
        self._entries[id(array)] = [array, provider, 0]
        return array

    def reset_counts(self) -> None:
        for entry in self._entries.values():
            entry[2] = 0

    def get_batch(self, data, seq_length, batch_size, device="cpu"):
        torch = self.REF.torch
        entry = self._entries.get(id(data))
        if entry is None:
            raise KeyError("get_batch called on an array the harness did not register")
        k = entry[2]
        entry[2] += 1
        x, y = entry[1](k)
        if x.shape != (batch_size, seq_length):
            raise ValueError(
                f"provider gave {x.shape}, the reference asked {(batch_size, seq_length)}"
            )
        return torch.from_numpy(np.ascontiguousarray(x, np.int64)), torch.from_numpy(
            np.ascontiguousarray(y, np.int64)
        )

    def restore(self) -> None:
        for mod, fn in self._orig.items():
            mod.get_batch = fn


def window_provider(windows: np.ndarray, batch_size: int):
    """Cycles over fixed windows `[W, T+1]` in batches of `batch_size` (W a multiple)."""
    n = windows.shape[0] // batch_size

    def provide(k):
        w = windows[(k % n) * batch_size : (k % n + 1) * batch_size]
        return w[:, :-1], w[:, 1:]

    return provide


def stream_provider(stream: np.ndarray, starts: np.ndarray, seq_len: int):
    """Windows of `stream` at `starts [calls, B]` (call `k` uses row `k`)."""

    def provide(k):
        s = starts[k]
        x = np.stack([stream[i : i + seq_len] for i in s])
        y = np.stack([stream[i + 1 : i + 1 + seq_len] for i in s])
        return x, y

    return provide


def jax_train_starts(
    key, lengths, *, steps_total: int, grad_accum: int, batch_size: int, seq_len: int
):
    """The window starts fedjax_lora's engine draws (sampling `random`), replayed on the host:
    `init_clients` splits `key` into (params, rng, data) and the rng over clients; each local step
    splits `rng -> (rng, k_batch, k_drop)` and micro-batch `m` draws
    `randint(fold_in(k_batch, m), (B,), 0, length - T)` (`engine.train`, `engine.batches`).
    Returns `int [N, steps_total * grad_accum, B]`."""
    import jax

    _, k_rng, _ = jax.random.split(key, 3)
    rngs = jax.random.split(k_rng, len(lengths))
    out = []
    for i, length in enumerate(lengths):
        rng = rngs[i]
        rows = []
        for _ in range(steps_total):
            rng, k_batch, _ = jax.random.split(rng, 3)
            for m in range(grad_accum):
                rows.append(
                    np.asarray(
                        jax.random.randint(
                            jax.random.fold_in(k_batch, m), (batch_size,), 0, int(length) - seq_len
                        )
                    )
                )
        out.append(np.stack(rows))
    return np.stack(out)


# ---------------------------------------------------------------------------------------------
# Data


def markov_streams(num_clients: int, groups: int, length: int, vocab: int, seed: int) -> list:
    """Client token streams from `groups` distinct sparse Markov chains (client i uses chain
    i % groups), so that validation-based trust has structure to find."""
    rng = np.random.default_rng(seed)
    chains = []
    for _ in range(groups):
        support = rng.integers(0, vocab, size=(vocab, 4))
        probs = rng.dirichlet(np.ones(4) * 0.5, size=vocab)
        chains.append((support, probs))
    streams = []
    for i in range(num_clients):
        support, probs = chains[i % groups]
        s = np.empty(length, np.int64)
        s[0] = rng.integers(vocab)
        for t in range(1, length):
            s[t] = support[s[t - 1], rng.choice(4, p=probs[s[t - 1]])]
        streams.append(s)
    return streams


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mib() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return float("nan")
