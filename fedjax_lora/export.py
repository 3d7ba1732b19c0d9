"""Export a client's adapters to Hugging Face PEFT, or its merged full weights to safetensors.

PEFT layout (`peft.LoraConfig` + `adapter_model.safetensors`): for a projection at HF path `m`,
`base_model.model.{m}.lora_A.weight: (r, in)` and `base_model.model.{m}.lora_B.weight: (out, r)`;
the delta is `scale · B A x` with `scale = lora_alpha / r` (`lora_alpha / sqrt(r)` with
`use_rslora`). Our LoRA on slices of a fused projection (GPT-2's `c_attn.q`, `c_attn.v`) becomes
one PEFT LoRA on the whole projection of rank `Σ r_k`: `A = [A_q; A_v]`, and `B` block-structured so
that each slice's rows only write its own output columns — the same function exactly.

A rank-masked LoRA (`RankedLoRA`: HetLoRA, FlexLoRA; `δ(x) = ((x A) ⊙ m) B` with the client's
rank scales `m` in its frozen state) exports as its effective LoRA: the active ranks `m_k > 0`
only, `A' = A[:, active]`, `B' = diag(m_active / s) B[active]`, scale `s = max m` (for every
client `m` is `s_i` on its active ranks, so `B' = B[active]`).

A CoMiGS mixture of LoRA experts (`fedjax_lora.moe`: comigs, comigs-2g, comigs-2s, comigs-tr,
pfedmoe, local-moe, fedavg-moe) exports to PEFT as its attention LoRA (the files above) plus the
experts, routers and expert masks of every MLP mixture in `experts.safetensors`, described by
`experts.json` (`MIXTURE_FORMAT`; the layout, shapes and forward: `docs/export.md`). A mixture
routes each token, so it has no merged weights: `save_merged` refuses it. Adapters without a
LoRA form (FedAMoLE's mixtures, soft prompts) are refused with a message naming them.

Merged weights: `W' = W + scale · A B` for every adapted projection, written with the HF names and
layouts of the base (so `models.load` and transformers read them) with a `config.json`.

From a run: `train_and_evaluate` saves every method's final stacked adapters
(`save_run_adapters`, `RUN_DIR/adapters/<method>.safetensors`); `export_run` (the CLI's
`fedjax-lora export RUN_DIR --method M [--client C] [--format peft|merged] --out DIR`) rebuilds
the base from the run's `config.json` (with the method's model surgery: hetlora and flexlora,
`lora_baselines.ranked_run_surgery`; the CoMiGS family, `comigs.moe_surgery`) and writes one
client's (or every client's) export.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from fedjax_lora import config as config_lib
from fedjax_lora.distributed import host
from fedjax_lora.engine.state import client_model_state
from fedjax_lora.families import family
from fedjax_lora.lora import LoRA
from fedjax_lora.models.config import ModelConfig
from fedjax_lora.models.layers import Adapter, Linear
from fedjax_lora.models.weights import hf_param_names
from fedjax_lora.moe.comigs import LoRAExperts, MoEMLP, TokenRouter
from fedjax_lora.typing import PyTree

__all__ = [
    "client_adapters",
    "client_model_state",
    "export_run",
    "hf_config",
    "load_run_adapters",
    "merged_state_dict",
    "save_merged",
    "save_mixtures",
    "save_run_adapters",
    "to_peft",
    "with_client",
]


def client_adapters(stacked: PyTree, client: int) -> PyTree:
    """Client `client`'s row of a stacked adapter tree."""
    return jax.tree.map(lambda x: x[client], stacked)


def with_client(graphdef: nnx.GraphDef, stacked: PyTree, base: nnx.State, client: int):
    """The model of one client: the shared base with that client's row of `stacked`
    (`client_model_state`: adapters and frozen state)."""
    return nnx.merge(graphdef, client_adapters(stacked, client), base)


def _lora_factors(lora: LoRA) -> tuple[np.ndarray, np.ndarray, float] | None:
    """`(A (in, r), B (r, out), scale)` of a LoRA's delta `scale · x A B`; a rank-masked LoRA
    (`rank_scale`, module docstring) gives its active ranks only (None when none is active)."""
    a, b = np.asarray(lora.a[...], np.float32), np.asarray(lora.b[...], np.float32)
    mask = getattr(lora, "rank_scale", None)
    if mask is None:
        return a, b, lora.scale
    m = np.asarray(mask[...], np.float32)
    active = m > 0
    if not active.any():
        return None
    scale = float(m[active].max())
    return a[:, active], b[active] * (m[active] / scale)[:, None], scale


def _path(path) -> str:
    return ".".join(str(p) for p in path)


def _mixtures(model: nnx.Module) -> dict[str, MoEMLP]:
    """`{hf_module_path: block}` of the model's CoMiGS mixture blocks."""
    return {_path(p): m for p, m in nnx.iter_graph(model) if isinstance(m, MoEMLP)}


def _check_lora_only(model: nnx.Module, *, mixtures: bool) -> None:
    """Raises unless every adapter of `model` belongs to a LoRA (plain or rank-masked) or, with
    `mixtures`, to a CoMiGS mixture block (its experts and router)."""
    for path, node in nnx.iter_graph(model):
        where = _path(path) or "the model"
        if isinstance(node, MoEMLP) and not mixtures:
            raise ValueError(
                f"{where}: a mixture of LoRA experts routes each token, so it has no merged "
                "weights; export it with --format peft (attention LoRA as PEFT, experts and "
                "routers in experts.safetensors, docs/export.md)"
            )
        if isinstance(node, LoRA | LoRAExperts | TokenRouter) or not isinstance(node, nnx.Module):
            continue
        if any(isinstance(v, Adapter) for v in vars(node).values()):
            raise ValueError(
                f"{where}: {type(node).__name__} adapters have no LoRA form; only LoRA, "
                "rank-masked LoRA (hetlora, flexlora) and, to PEFT, CoMiGS's mixtures (comigs, "
                "pfedmoe, fedavg-moe, ...) export, not FedAMoLE's mixtures (fedamole) or soft "
                "prompts (fedprompt, fedptuning)"
            )


def _module_deltas(
    model: nnx.Module, *, mixtures: bool = False
) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """`{hf_module_path: (A (in, R), B (R, out), scale)}`, slices of a projection combined (each
    slice's scale folded into its rows of B relative to the first slice's scale); `mixtures`:
    CoMiGS mixture blocks are allowed (their frozen projections hold no LoRA)."""
    _check_lora_only(model, mixtures=mixtures)
    out = {}
    for path, linear in nnx.iter_graph(model):
        if not isinstance(linear, Linear):
            continue
        parts = []
        for slot in linear.slot_names():
            lora = getattr(linear, Linear.slot_attr(slot), None)
            factors = None if lora is None else _lora_factors(lora)
            if factors is None:
                continue
            start, stop = (0, linear.out_features) if slot == "" else linear.slices[slot]
            parts.append((*factors, start, stop))
        if not parts:
            continue
        scale = parts[0][2]
        a = np.concatenate([p[0] for p in parts], axis=1)
        b = np.zeros((a.shape[1], linear.out_features), np.float32)
        row = 0
        for pa, pb, s, start, stop in parts:
            b[row : row + pa.shape[1], start:stop] = pb * (s / scale)
            row += pa.shape[1]
        out[_path(path)] = (a, b, scale)
    return out


def to_peft(
    model: nnx.Module,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Writes `adapter_config.json` and `adapter_model.safetensors` (PEFT's names) for a model
    holding one client's LoRA adapters. Each module's `lora_alpha` reproduces its scale exactly
    (`alpha = scale · r`, `use_rslora` off); modules whose rank or alpha differ from the most
    common one go into PEFT's `rank_pattern` / `alpha_pattern`. A model with CoMiGS mixtures also
    gets `experts.safetensors` and `experts.json` (`save_mixtures`; the PEFT files then hold its
    attention LoRA, and are left out when it has none)."""
    deltas = _module_deltas(model, mixtures=True)
    out = Path(out_dir)
    if _mixtures(model):
        save_mixtures(model, out, base_model_name_or_path=base_model_name_or_path)
        if not deltas:
            return out
    elif not deltas:
        raise ValueError("the model holds no LoRA adapters to export")
    tensors = {}
    ranks, alphas = {}, {}
    for module, (a, b, scale) in deltas.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(b.T)
        ranks[module] = a.shape[1]
        alphas[module] = scale * a.shape[1]
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    cfg: ModelConfig = model.config
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "fan_in_fan_out": family(cfg.family).conv1d,
        "target_modules": "^(?:" + "|".join(m.replace(".", r"\.") for m in deltas) + ")$",
        "rank_pattern": {m: k for m, k in ranks.items() if k != r},
        "alpha_pattern": {m: k for m, k in alphas.items() if not math.isclose(k, alpha)},
        "inference_mode": True,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


MIXTURE_FORMAT = "fedjax_lora.mixture_of_lora_experts/1"
"""The `format` of `experts.json`: the layout `save_mixtures` writes (`docs/export.md`)."""

_ROUTING = (
    "z = h @ router.weight.T (gate linear) or tanh(h @ router.weight.T) @ router.out.weight.T "
    "(gate tanh_mlp), h the MLP input [..., d], in f32; z_e = -inf where expert_mask_e = 0; "
    "k = min(top_k, num_experts): k >= 2: w = softmax over the k largest z, 0 elsewhere; k = 1: "
    "w = softmax(z) at the argmax, 0 elsewhere (not renormalised); num_experts = 1: w = 1, no "
    "router"
)
_FORWARD = {
    "gpt2": "g_e = act(h W_fc + b_fc + s (h A_fc_e^T) B_fc_e^T); y = sum_e w_e (g_e W_proj "
    "+ b_proj + s (g_e A_proj_e^T) B_proj_e^T), W (in, out) the base's c_fc / c_proj (Conv1D), "
    "A = experts.<proj>.lora_A.weight[e] (r, in), B = experts.<proj>.lora_B.weight[e] (out, r)",
    "llama": "g_e = silu(h W_gate^T + s (h A_gate_e^T) B_gate_e^T) * (h W_up^T + s (h A_up_e^T) "
    "B_up_e^T); y = sum_e w_e (g_e W_down^T + s (g_e A_down_e^T) B_down_e^T), W (out, in) the "
    "base's gate_proj / up_proj / down_proj, A = experts.<proj>.lora_A.weight[e] (r, in), "
    "B = experts.<proj>.lora_B.weight[e] (out, r)",
}


def save_mixtures(
    model: nnx.Module, out_dir: str | os.PathLike, *, base_model_name_or_path: str | None = None
) -> Path:
    """Writes the CoMiGS mixtures of a model holding one client's adapters: `experts.safetensors`
    (f32; per mixture block `m`, e.g. `transformer.h.0.mlp`: `m.experts.<proj>.lora_A.weight
    [E, r, in]` and `lora_B.weight [E, out, r]` per projection, `m.router.weight [E, d]` (and
    `m.router.out.weight [E, E]` for the `tanh_mlp` gate), `m.expert_mask [E]` uint8, the
    client's experts) and `experts.json` (`MIXTURE_FORMAT`: the mixture's settings, the routing
    and the forward as formulas, expert 0 the generalist, the blocks' tensor names and shapes)."""
    blocks = _mixtures(model)
    if not blocks:
        raise ValueError("the model holds no mixture of LoRA experts to export")
    cfg: ModelConfig = model.config
    tensors: dict[str, np.ndarray] = {}
    described = {}
    for name, block in blocks.items():
        own: dict[str, np.ndarray] = {}
        for proj in (*block.inputs, block.output):
            lora = getattr(block.experts, proj)
            a, b = np.asarray(lora.a[...], np.float32), np.asarray(lora.b[...], np.float32)
            own[f"{name}.experts.{proj}.lora_A.weight"] = a.transpose(0, 2, 1)
            own[f"{name}.experts.{proj}.lora_B.weight"] = b.transpose(0, 2, 1)
        mask = np.asarray(block.expert_mask[...], bool)
        own[f"{name}.expert_mask"] = mask.astype(np.uint8)
        if block.router is not None:
            own[f"{name}.router.weight"] = np.asarray(block.router.w[...], np.float32).T
            if block.router.w_out is not None:
                own[f"{name}.router.out.weight"] = np.asarray(block.router.w_out[...], np.float32).T
        tensors.update({k: np.ascontiguousarray(v) for k, v in own.items()})
        described[name] = {
            "inputs": list(block.inputs),
            "output": block.output,
            "expert_mask": mask.astype(int).tolist(),
            "tensors": {k: list(v.shape) for k, v in own.items()},
        }
    first = next(iter(blocks.values()))
    lora = getattr(first.experts, first.output)
    rank = lora.a.get_value().shape[-1]
    router = first.router
    manifest = {
        "format": MIXTURE_FORMAT,
        "base_model_name_or_path": base_model_name_or_path,
        "family": cfg.family,
        "activation": "silu" if cfg.family == "llama" else cfg.activation,
        "num_experts": int(first.expert_mask.get_value().shape[0]),
        "top_k": first.k,
        "rank": int(rank),
        "scale": lora.scale,
        "lora_alpha": lora.scale * math.sqrt(rank),
        "generalist": 0,
        "gate": None if router is None else "tanh_mlp" if router.w_out is not None else "linear",
        "routing": _ROUTING,
        "forward": _FORWARD[cfg.family],
        "blocks": described,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "experts.json").write_text(json.dumps(manifest, indent=2))
    save_file(tensors, str(out / "experts.safetensors"))
    return out


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """A transformers `config.json` dictionary for a model config."""
    spec = family(cfg.family)
    sizes = {
        spec.hf_fields[f]: getattr(cfg, f)
        for f in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_positions")
    }
    if spec.name == "gpt2":
        return {
            "model_type": spec.hf_model_types[0],
            "architectures": ["GPT2LMHeadModel"],
            **sizes,
            "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": "gelu_new" if cfg.activation == "gelu_tanh" else "gelu",
            "tie_word_embeddings": cfg.tie_embeddings,
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id,
        }
    return {
        "model_type": "qwen2" if cfg.qkv_bias else "llama",
        "architectures": ["Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"],
        **sizes,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.dim_per_head,
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.qkv_bias,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
    }


def merged_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The base weights with every LoRA merged in (`W + scale · A B`), HF names and layouts (a
    model without adapters gives its own weights: a checkpoint of a base trained in JAX)."""
    deltas = _module_deltas(model)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    state = {}
    for hf_name, (path, transpose) in hf_param_names(model).items():
        value = np.asarray(flat[path].get_value(), np.float32)
        module = ".".join(str(p) for p in path[:-1])
        if path[-1] == "kernel" and module in deltas:
            a, b, scale = deltas[module]
            value = value + scale * (a @ b)
        state[hf_name] = np.ascontiguousarray(value.T if transpose else value)
    return state


def save_merged(model: nnx.Module, out_dir: str | os.PathLike) -> Path:
    """Writes `config.json` and `model.safetensors` (f32) of the merged model."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(model.config), indent=2))
    save_file(merged_state_dict(model), str(out / "model.safetensors"))
    return out


ADAPTERS_DIR = "adapters"
"""Where `train_and_evaluate` saves each method's final adapters: `RUN_DIR/adapters/<method>`."""


def save_run_adapters(
    path: str | os.PathLike, stacked: nnx.State, client_names: list[str], round_idx: int
) -> Path:
    """Writes a method's final stacked adapters (`[N, ...]` per leaf, or `[1, ...]` for one model
    shared by every client) to `path` (safetensors, leaves named by their dotted module path;
    the client names and the round in its metadata)."""
    tensors = {
        ".".join(str(p) for p in key): np.ascontiguousarray(host(var.get_value()))
        for key, var in nnx.to_flat_state(stacked)
    }
    meta = {"client_names": json.dumps(list(client_names)), "round": str(round_idx)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def load_run_adapters(path: str | os.PathLike, template: nnx.State) -> tuple[nnx.State, list[str]]:
    """The stacked adapters `save_run_adapters` wrote, as a tree like `template` (one client's
    adapters), and the client names. Raises when the saved leaves are not the template's (a
    method with other adapters than the config's LoRA, e.g. mixtures of experts)."""
    with safe_open(str(path), "numpy") as f:
        names = json.loads(f.metadata()["client_names"])
        saved = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    flat = list(nnx.to_flat_state(template))
    expected = {".".join(str(p) for p in key): var.get_value().shape for key, var in flat}
    got = {k: v.shape[1:] for k, v in saved.items()}
    if got != {k: tuple(s) for k, s in expected.items()}:
        differ = sorted(set(got) ^ set(expected)) or sorted(
            k for k in got if got[k] != tuple(expected[k])
        )
        raise ValueError(
            f"{path} holds adapters other than the method's model (first differences: "
            f"{differ[:3]}); only methods whose adapters are LoRA (plain, or rank-masked: "
            "hetlora, flexlora) or CoMiGS's mixtures (comigs, pfedmoe, fedavg-moe, ...) export, "
            "not FedAMoLE's mixtures (fedamole) or soft prompts (fedprompt, fedptuning)"
        )
    leaves = [(key, var.replace(saved[".".join(str(p) for p in key)])) for key, var in flat]
    return nnx.from_flat_state(leaves), names


def _method_model(config, method: str) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """`(graphdef, client template, base)` of method `method`'s model in a run of `config`: the
    config's base and LoRA, changed by the method's surgery for the ranked methods (hetlora,
    flexlora: `lora_baselines.ranked_run_surgery`) and the CoMiGS family (`comigs.moe_surgery`);
    the template holds one client's adapters and frozen state."""
    from fedjax_lora.algorithms.comigs import CoMiGSOptions, moe_surgery
    from fedjax_lora.algorithms.lora_baselines import (
        FlexLoRAOptions,
        HetLoRAOptions,
        ranked_run_surgery,
    )
    from fedjax_lora.algorithms.problem import split_model
    from fedjax_lora.experiment import build_model, method_factory  # they save through here

    model = build_model(config)[0]
    options = method_factory(method, config).keywords["options"]
    if isinstance(options, HetLoRAOptions | FlexLoRAOptions):
        ranked_run_surgery(options)(model)
    elif isinstance(options, CoMiGSOptions):
        moe_surgery(options.mixture)(model)
    graphdef, adapters, frozen, base = split_model(model)
    return graphdef, nnx.merge_state(adapters, frozen), base


def export_run(
    run_dir: str | os.PathLike,
    method: str,
    out_dir: str | os.PathLike,
    *,
    client: str | None = None,
    fmt: str = "peft",
) -> list[Path]:
    """Exports the final adapters of `method` in the run directory `run_dir` (its `config.json`
    and `adapters/<method>.safetensors`): for `client` (a client name or index; None: every
    client) to `out_dir/<client name>/`, as PEFT adapters (`to_peft`; with a CoMiGS method's
    experts and routers, `save_mixtures`) or merged weights (`save_merged`, `fmt="merged"`;
    refused for mixtures). The base is rebuilt from the config (`model.source`, or the
    tiny random base from its seed). Returns the written directories."""
    run = Path(run_dir)
    if fmt not in ("peft", "merged"):
        raise ValueError(f"export format must be peft or merged, got {fmt!r}")
    if not (run / "config.json").is_file():
        raise FileNotFoundError(f"{run} holds no config.json; give the directory of a finished run")
    saved = run / ADAPTERS_DIR / f"{method}.safetensors"
    if not saved.is_file():
        have = sorted(p.stem for p in (run / ADAPTERS_DIR).glob("*.safetensors"))
        raise FileNotFoundError(
            f"{run} holds no final adapters of method {method!r}; saved methods: {have or 'none'}"
        )
    config = config_lib.from_dict(
        config_lib.ExperimentConfig, json.loads((run / "config.json").read_text())
    )
    graphdef, template, base = _method_model(config, method)
    stacked, names = load_run_adapters(saved, template)
    if client is None:
        chosen = list(range(len(names)))
    elif client in names:
        chosen = [names.index(client)]
    elif client.isdigit() and int(client) < len(names):
        chosen = [int(client)]
    else:
        raise ValueError(f"unknown client {client!r}; the run's clients are {names}")
    rows = jax.tree.leaves(stacked)[0].shape[0]  # 1: one model shared by every client
    written = []
    for c in chosen:
        model = with_client(graphdef, stacked, base, c if rows > 1 else 0)
        target = Path(out_dir) / names[c]
        if fmt == "peft":
            written.append(to_peft(model, target, base_model_name_or_path=config.model.source))
        else:
            written.append(save_merged(model, target))
    return written
