"""Architecture configuration of the supported base language models."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, Literal

Family = Literal["gpt2", "llama"]
Activation = Literal["gelu_tanh", "gelu_erf", "silu"]

# Hugging Face `model_type` values and the family that implements them.
HF_MODEL_TYPES: dict[str, Family] = {
    "gpt2": "gpt2",
    "llama": "llama",
    "qwen2": "llama",
    "mistral": "llama",
}
_HF_GELU = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu_erf"}


class FrozenMapping(Mapping):
    """An immutable, hashable mapping (hashable values), so that configs and modules holding one
    can be static: `jax.jit(..., static_argnums=...)` on an `nnx.GraphDef` hashes them."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[Any, Any] | None = None, **kwargs: Any):
        self._data = dict(data or {}, **kwargs)

    def __getitem__(self, key: Any) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._data.items(), key=lambda kv: repr(kv[0]))))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._data) == dict(other)

    def __repr__(self) -> str:
        return repr(self._data)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes and options of a decoder-only language model.

    `family="gpt2"`: learned positions, LayerNorm, fused `c_attn`, GELU MLP, biases, tied head.
    `family="llama"`: RoPE, RMSNorm, grouped-query attention, SwiGLU MLP (Llama-3.x, SmolLM2,
    Qwen2/2.5 with `qkv_bias=True`).
    """

    family: Family
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    max_positions: int
    n_kv_heads: int | None = None
    head_dim: int | None = None
    norm_eps: float = 1e-5
    activation: Activation = "gelu_tanh"
    tie_embeddings: bool = True
    qkv_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None  # stored as a hashable FrozenMapping
    dropout: float = 0.0  # residual/embedding dropout (GPT-2 `resid_pdrop`, `embd_pdrop`)
    attn_dropout: float = 0.0  # attention-probability dropout
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, FrozenMapping):
            object.__setattr__(self, "rope_scaling", FrozenMapping(self.rope_scaling))
        if self.family not in ("gpt2", "llama"):
            raise ValueError(
                f"unknown architecture family {self.family!r}; supported: 'gpt2', 'llama'"
            )
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_positions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.num_kv_heads and self.n_heads % self.num_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.num_kv_heads}"
            )

    @property
    def num_kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Builds a config from a Hugging Face `config.json` dictionary."""
        model_type = hf.get("model_type")
        family = HF_MODEL_TYPES.get(model_type)
        if family is None:
            raise ValueError(
                f"unknown architecture model_type={model_type!r} in config.json; supported: "
                f"{sorted(HF_MODEL_TYPES)}"
            )
        if family == "gpt2":
            act = _HF_GELU.get(hf.get("activation_function", "gelu_new"))
            if act is None:
                raise ValueError(f"unsupported GPT-2 activation {hf['activation_function']!r}")
            d = hf["n_embd"]
            return cls(
                family="gpt2",
                vocab_size=hf["vocab_size"],
                d_model=d,
                n_layers=hf["n_layer"],
                n_heads=hf["n_head"],
                d_ff=hf.get("n_inner") or 4 * d,
                max_positions=hf["n_positions"],
                norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                activation=act,
                tie_embeddings=hf.get("tie_word_embeddings", True),
                qkv_bias=True,
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=hf.get("eos_token_id"),
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported Llama activation {hf['hidden_act']!r}; expected 'silu'")
        rope_scaling = hf.get("rope_scaling")
        rope_theta = hf.get("rope_theta", 10000.0)
        rope_params = hf.get("rope_parameters")  # transformers 5 keeps rope settings here
        if rope_params:
            rope_theta = rope_params.get("rope_theta", rope_theta)
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = rope_params
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
            rope_scaling = None
        return cls(
            family="llama",
            vocab_size=hf["vocab_size"],
            d_model=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads"),
            head_dim=hf.get("head_dim"),
            d_ff=hf["intermediate_size"],
            max_positions=hf.get("max_position_embeddings", 2048),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            activation="silu",
            tie_embeddings=hf.get("tie_word_embeddings", False),
            qkv_bias=hf.get("attention_bias", model_type == "qwen2"),
            rope_theta=rope_theta,
            rope_scaling=dict(rope_scaling) if rope_scaling else None,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=_first(hf.get("eos_token_id")),
        )


def _first(x):
    return x[0] if isinstance(x, list) else x
