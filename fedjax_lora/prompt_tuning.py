r"""Soft prompts: `P` trainable virtual-token embeddings before the input tokens (PEFT's prompt
learning), as `Adapter` modules on the model's `prompt` slot.

- **Prompt tuning** (Lester, Al-Rfou & Constant, EMNLP 2021; PEFT `PromptTuningConfig`): the
  prompt is a table `E ∈ R^{P×d}`, trained directly.
- **P-tuning** (Liu et al., "GPT Understands, Too", 2021; PEFT `PromptEncoderConfig`): the prompt
  is `f(E)`, a reparameterisation of a table `E ∈ R^{P×d}` by a prompt encoder `f`, trained
  jointly: `mlp`: `f(E) = W₃ relu(W₂ relu(W₁ E + b₁) + b₂) + b₃` with hidden size `h`; `lstm`: a
  bidirectional `L`-layer LSTM of hidden size `h` followed by `W₂ relu(W₁ [h→; h←] + b₁) + b₂`.

Either sits in `CausalLM.prompt`: the model's `input_embeddings` prepends `prompt(rngs)`
(`[P, d]`) to every sequence; the real tokens move to positions `P, P+1, …` and the `P` prefix
outputs are dropped, so logits stay `[B, T, V]` (`fedjax_lora.models.causal_lm`). Initial values
follow PyTorch/PEFT: tables `N(0, 1)` (`nn.Embedding`), linear layers and LSTM weights
`U(±1/sqrt(fan))` (`nn.Linear`: fan = inputs, `nn.LSTM`: fan = hidden size). Prompt tuning can
also start from token embeddings (PEFT `TEXT` and `SAMPLE_VOCAB` inits), which every client
shares (`Init("fixed")`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedjax_lora.lora import Init, init_adapters
from fedjax_lora.models.causal_lm import CausalLM
from fedjax_lora.models.layers import Adapter, dropout

__all__ = [
    "PTuningConfig",
    "PromptConfig",
    "PromptEncoder",
    "PromptTuningConfig",
    "SoftPrompt",
    "attach_prompt",
    "detach_prompt",
]


@dataclasses.dataclass(frozen=True)
class PromptTuningConfig:
    """Prompt tuning: `num_virtual_tokens` trainable embeddings.

    init: `"random"`: N(0, 1) per client draw (PEFT `RANDOM`); `"vocab"`: the embeddings of
      `num_virtual_tokens` token ids drawn uniformly from the vocabulary once (PEFT
      `SAMPLE_VOCAB`); `"text"`: the embeddings of `init_token_ids` (the tokenized init text),
      repeated or cut to `num_virtual_tokens` (PEFT `TEXT`; `num_virtual_tokens=None` takes the
      text's length, as the FedAMoLE reference does).
    """

    num_virtual_tokens: int | None = 20
    init: Literal["random", "vocab", "text"] = "random"
    init_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "init_token_ids", tuple(int(i) for i in self.init_token_ids))
        if self.init not in ("random", "vocab", "text"):
            raise ValueError(f"init must be 'random', 'vocab' or 'text', got {self.init!r}")
        if self.init == "text" and not self.init_token_ids:
            raise ValueError("init='text' needs init_token_ids (the tokenized init text)")
        if self.num_virtual_tokens is None and self.init != "text":
            raise ValueError("num_virtual_tokens=None (the text's length) needs init='text'")
        if self.num_virtual_tokens is not None and self.num_virtual_tokens < 0:
            raise ValueError(f"num_virtual_tokens must be >= 0, got {self.num_virtual_tokens}")

    @property
    def length(self) -> int:
        """`P`."""
        if self.num_virtual_tokens is None:
            return len(self.init_token_ids)
        return self.num_virtual_tokens

    def make(self, model: CausalLM, key: jax.Array) -> SoftPrompt:
        d = model.config.d_model
        dtype = jnp.dtype(self.dtype)
        if self.init == "random":
            return SoftPrompt(np.zeros((self.length, d), dtype), Init("normal", std=1.0))
        vocab = model.config.vocab_size
        if self.init == "vocab":
            ids = jax.random.randint(key, (self.length,), 0, vocab)
        else:
            if max(self.init_token_ids) >= vocab or min(self.init_token_ids) < 0:
                raise ValueError(
                    f"init_token_ids must lie in [0, {vocab}) (the model's vocabulary), got "
                    f"{min(self.init_token_ids)}..{max(self.init_token_ids)}"
                )
            reps = -(-self.length // len(self.init_token_ids))
            ids = np.asarray((self.init_token_ids * reps)[: self.length], np.int32)
        # jnp, not NumPy: the base may be traced (a factory called inside a vectorized sweep).
        rows = jnp.take(model.embedding().weight[...].astype(jnp.float32), jnp.asarray(ids), 0)
        return SoftPrompt(rows.astype(dtype), Init("fixed"))


@dataclasses.dataclass(frozen=True)
class PTuningConfig:
    """P-tuning: `num_virtual_tokens` embeddings reparameterised by a prompt encoder.

    encoder: `"mlp"` (the FedAMoLE reference) or `"lstm"`; hidden_size: the encoder's `h` (the
    reference: 1024); num_layers, dropout: the LSTM's layers and the dropout between them (PEFT's
    `encoder_num_layers`, `encoder_dropout`; the MLP always has two hidden layers).
    """

    num_virtual_tokens: int = 20
    encoder: Literal["mlp", "lstm"] = "mlp"
    hidden_size: int = 1024
    num_layers: int = 2
    dropout: float = 0.0
    dtype: str = "float32"

    def __post_init__(self):
        if self.encoder not in ("mlp", "lstm"):
            raise ValueError(f"encoder must be 'mlp' or 'lstm', got {self.encoder!r}")
        for name in ("num_virtual_tokens", "hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"PTuningConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def length(self) -> int:
        return self.num_virtual_tokens

    def make(self, model: CausalLM, key: jax.Array) -> PromptEncoder:
        del key  # every value is drawn by `init_adapters`
        return PromptEncoder(model.config.d_model, self)


PromptConfig = PromptTuningConfig | PTuningConfig


class SoftPrompt(nnx.Module):
    """Prompt tuning: `prompt() = E`, a trainable `[P, d]` table."""

    def __init__(self, table: np.ndarray, init: Init):
        self.embedding = Adapter(table, init=init)
        self.num_virtual_tokens = int(table.shape[0])

    def __call__(self, rngs: nnx.Rngs | None = None) -> jax.Array:
        del rngs
        return self.embedding[...]


def _weights(fan_in: int, shape: tuple[int, ...], dtype, bound_fan: int | None = None) -> Adapter:
    """A PyTorch-initialised weight: U(±1/sqrt(bound_fan or fan_in))."""
    bound = 1.0 / math.sqrt(bound_fan or fan_in)
    return Adapter(np.zeros(shape, dtype), init=Init("uniform", bound=bound))


class _Dense(nnx.Module):
    """`x W + b` with `W: (in, out)` and PyTorch's `nn.Linear` init."""

    def __init__(self, in_features: int, out_features: int, dtype):
        self.kernel = _weights(in_features, (in_features, out_features), dtype)
        self.bias = _weights(in_features, (out_features,), dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.kernel[...] + self.bias[...]


class _LSTMDirection(nnx.Module):
    """One direction of one LSTM layer, PyTorch layout: gates `i, f, g, o` along the `4h` axis,
    `c' = σ(f) c + σ(i) tanh(g)`, `h' = σ(o) tanh(c')`, all weights U(±1/sqrt(h))."""

    def __init__(self, in_features: int, hidden: int, dtype):
        self.w_ih = _weights(in_features, (in_features, 4 * hidden), dtype, bound_fan=hidden)
        self.w_hh = _weights(hidden, (hidden, 4 * hidden), dtype, bound_fan=hidden)
        self.b_ih = _weights(hidden, (4 * hidden,), dtype)
        self.b_hh = _weights(hidden, (4 * hidden,), dtype)
        self.hidden = hidden

    def __call__(self, x: jax.Array) -> jax.Array:
        """`x: [P, in] -> [P, h]`, scanning in the given order."""
        gates_x = x @ self.w_ih[...] + self.b_ih[...] + self.b_hh[...]
        w_hh = self.w_hh[...]

        def step(carry, gx):
            h, c = carry
            i, f, g, o = jnp.split(gx + h @ w_hh, 4)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), h

        zeros = jnp.zeros((self.hidden,), gates_x.dtype)
        return jax.lax.scan(step, (zeros, zeros), gates_x)[1]


class PromptEncoder(nnx.Module):
    """P-tuning's prompt encoder (PEFT `PromptEncoder`): `prompt() = f(E)`, `E: [P, d]`."""

    def __init__(self, d_model: int, config: PTuningConfig):
        dtype = jnp.dtype(config.dtype)
        p, h = config.num_virtual_tokens, config.hidden_size
        self.num_virtual_tokens = p
        self.dropout = config.dropout
        self.embedding = Adapter(np.zeros((p, d_model), dtype), init=Init("normal", std=1.0))
        if config.encoder == "mlp":
            self.lstm_head = None
            self.mlp_head = nnx.List(
                [_Dense(d_model, h, dtype), _Dense(h, h, dtype), _Dense(h, d_model, dtype)]
            )
        else:
            widths = [d_model] + [2 * h] * (config.num_layers - 1)
            self.lstm_head = nnx.List(
                [
                    nnx.List([_LSTMDirection(w, h, dtype), _LSTMDirection(w, h, dtype)])
                    for w in widths
                ]
            )
            self.mlp_head = nnx.List([_Dense(2 * h, 2 * h, dtype), _Dense(2 * h, d_model, dtype)])

    def __call__(self, rngs: nnx.Rngs | None = None) -> jax.Array:
        x = self.embedding[...]
        if self.lstm_head is not None:
            for i, (forward, backward) in enumerate(self.lstm_head):
                if i:
                    x = dropout(x, self.dropout, rngs)
                x = jnp.concatenate([forward(x), backward(x[::-1])[::-1]], axis=-1)
        for i, layer in enumerate(self.mlp_head):
            x = layer(x) if i == len(self.mlp_head) - 1 else jax.nn.relu(layer(x))
        return x


def detach_prompt(model: CausalLM) -> None:
    """Removes the model's soft prompt, in place (no-op without one)."""
    if getattr(model, "prompt", None) is not None:
        del model.prompt


def attach_prompt(model: CausalLM, config: PromptConfig, *, key: jax.Array | None = None) -> int:
    """Puts `config`'s prompt module in `model.prompt` (replacing any), in place, and draws all
    of the model's adapters from `key` (`init_adapters`, as `lora.attach_adapters`); `key` also
    draws the `vocab` init's token ids. Returns `P`.
    """
    if not isinstance(model, CausalLM):
        raise ValueError(f"soft prompts need a CausalLM, got {type(model).__name__}")
    key = jax.random.key(0) if key is None else key
    k_make, k_init = jax.random.split(key)
    detach_prompt(model)
    model.prompt = config.make(model, k_make)
    nnx.update(model, jax.jit(init_adapters)(nnx.state(model, Adapter), k_init))
    return config.length
