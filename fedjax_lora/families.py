"""Model families: everything the library knows about an architecture family, in one spec.

A `FamilySpec` holds what the model loaders, the exporter, the memory estimate and the methods'
default targets read about a family: its Hugging Face `model_type`s and `config.json` field
names, its backbone prefix and embedding name, GGUF (llama.cpp) architecture and tensor names,
whether its projections are stored as `Conv1D` (`(in, out)`, PEFT's `fan_in_fan_out`), and the
default adapter targets per method family. `FAMILIES` is the registry, `family(name)` the lookup;
adding a family is one spec plus its NNX model class. JAX-free (the config imports `NAMES`).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any

_REQUIRED = object()

__all__ = ["FAMILIES", "NAMES", "FamilySpec", "family", "family_of_hf", "family_of_gguf"]


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """One model family.

    name: the `ModelConfig.family` value.
    model_class: `"module:Class"` of the NNX model (imported on first use).
    hf_model_types: Hugging Face `model_type`s the family implements (`config.json`).
    hf_fields: `ModelConfig` field -> `config.json` key.
    backbone_prefix: HF prefix of the backbone (`transformer.`, `model.`); bare checkpoints
        (e.g. the hub's `gpt2`) omit it.
    embedding: the token embedding's HF name under the backbone.
    conv1d: projections under the backbone are HF `Conv1D` (`(in, out)`, not transposed at
        load; PEFT `fan_in_fan_out`).
    gguf_architectures: llama.cpp `general.architecture` values the family reads.
    gguf_names: llama.cpp top-level tensor name -> HF name.
    gguf_block: llama.cpp per-block tensor part -> HF module under `gguf_block_prefix.{layer}`.
    gguf_block_prefix: HF prefix of the blocks.
    gguf_permuted_qk: the architectures whose q/k rows llama.cpp permuted for interleaved RoPE
        (undone at load; its Qwen2 converter does not permute).
    learned_positions: a learned position embedding (`max_positions · d` parameters).
    mlp_matrices: weight matrices of `d · d_ff` per MLP (GPT-2 2, SwiGLU 3).
    lora_targets: default LoRA targets (all attention and MLP projections).
    amole_targets: FedAMoLE's default targets (q and v: PEFT's Llama default; GPT-2 holds them
        as slices of `c_attn`).
    """

    name: str
    model_class: str
    hf_model_types: tuple[str, ...]
    hf_fields: Mapping[str, str]
    backbone_prefix: str
    embedding: str
    conv1d: bool
    gguf_architectures: tuple[str, ...]
    gguf_names: Mapping[str, str]
    gguf_block: Mapping[str, str]
    gguf_block_prefix: str
    gguf_permuted_qk: tuple[str, ...]
    learned_positions: bool
    mlp_matrices: int
    lora_targets: tuple[str, ...]
    amole_targets: tuple[str, ...]

    def model(self) -> Any:
        """The NNX model class (imports JAX)."""
        module, cls = self.model_class.split(":")
        return getattr(importlib.import_module(module), cls)

    def hf(self, hf_config: Mapping[str, Any], field: str, default: Any = _REQUIRED) -> Any:
        """The `config.json` value of a `ModelConfig` field: `default` when absent, a `KeyError`
        naming the `config.json` key when absent and required."""
        key = self.hf_fields[field]
        return hf_config[key] if default is _REQUIRED else hf_config.get(key, default)


GPT2 = FamilySpec(
    name="gpt2",
    model_class="fedjax_lora.models.gpt2:GPT2LMHeadModel",
    hf_model_types=("gpt2",),
    hf_fields={
        "vocab_size": "vocab_size",
        "d_model": "n_embd",
        "n_layers": "n_layer",
        "n_heads": "n_head",
        "d_ff": "n_inner",
        "max_positions": "n_positions",
        "norm_eps": "layer_norm_epsilon",
        "activation": "activation_function",
    },
    backbone_prefix="transformer.",
    embedding="wte.weight",
    conv1d=True,
    gguf_architectures=("gpt2",),
    gguf_names={
        "token_embd.weight": "transformer.wte.weight",
        "position_embd.weight": "transformer.wpe.weight",
        "output_norm.weight": "transformer.ln_f.weight",
        "output_norm.bias": "transformer.ln_f.bias",
        "output.weight": "lm_head.weight",
    },
    gguf_block={
        "attn_norm": "ln_1",
        "ffn_norm": "ln_2",
        "attn_qkv": "attn.c_attn",
        "attn_output": "attn.c_proj",
        "ffn_up": "mlp.c_fc",
        "ffn_down": "mlp.c_proj",
    },
    gguf_block_prefix="transformer.h",
    gguf_permuted_qk=(),
    learned_positions=True,
    mlp_matrices=2,
    lora_targets=("c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    amole_targets=("c_attn.q", "c_attn.v"),
)

LLAMA = FamilySpec(
    name="llama",
    model_class="fedjax_lora.models.llama:LlamaForCausalLM",
    hf_model_types=("llama", "qwen2", "mistral"),
    hf_fields={
        "vocab_size": "vocab_size",
        "d_model": "hidden_size",
        "n_layers": "num_hidden_layers",
        "n_heads": "num_attention_heads",
        "n_kv_heads": "num_key_value_heads",
        "head_dim": "head_dim",
        "d_ff": "intermediate_size",
        "max_positions": "max_position_embeddings",
        "norm_eps": "rms_norm_eps",
        "activation": "hidden_act",
        "qkv_bias": "attention_bias",
    },
    backbone_prefix="model.",
    embedding="embed_tokens.weight",
    conv1d=False,
    gguf_architectures=("llama", "qwen2"),
    gguf_names={
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    },
    gguf_block={
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    },
    gguf_block_prefix="model.layers",
    gguf_permuted_qk=("llama",),
    learned_positions=False,
    mlp_matrices=3,
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    amole_targets=("q_proj", "v_proj"),
)

FAMILIES: dict[str, FamilySpec] = {spec.name: spec for spec in (GPT2, LLAMA)}
NAMES: tuple[str, ...] = tuple(FAMILIES)


def family(name: str) -> FamilySpec:
    """The spec of a family; an unknown name fails naming the supported ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(
            f"unknown architecture family {name!r}; supported: {', '.join(map(repr, NAMES))}"
        ) from None


def family_of_hf(model_type: str | None) -> FamilySpec | None:
    """The family implementing a Hugging Face `model_type` (None when none does)."""
    return next((s for s in FAMILIES.values() if model_type in s.hf_model_types), None)


def family_of_gguf(architecture: str) -> FamilySpec | None:
    """The family reading a llama.cpp architecture (None when none does)."""
    return next((s for s in FAMILIES.values() if architecture in s.gguf_architectures), None)
