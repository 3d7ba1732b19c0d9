"""The language-modelling loss of a merged model: token cross-entropy plus auxiliary losses.

Two memory settings (`LocalTraining.remat`, `LocalTraining.ce_chunk`):
- `remat`: every transformer block runs under `nnx.remat` (`jax.checkpoint`), so the backward
  pass keeps one block's input per layer and recomputes the activations inside the block;
- `ce_chunk`: the output head and the cross-entropy run over `ce_chunk` tokens at a time
  (`chunked_token_cross_entropy`), so the `[B, T, V]` logits never exist at once.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jaxtyping import Array, Float, Int

from fedjax_lora.engine.batches import Batch
from fedjax_lora.typing import PyTree

AUX_LOSS = "aux_loss"

_ROUTING_TOKENS: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar(
    "routing_tokens", default=None
)


@contextlib.contextmanager
def routing_tokens(mask: jax.Array | None) -> Iterator[None]:
    """Within the block, modules that average routing statistics over token positions (FedAMoLE's
    load-balancing loss) count only the tokens where `mask [B, T]` is nonzero
    (`routing_token_mask`); None: every position. Read while tracing, so it covers the forward
    pass traced inside the block (`lm_loss` sets it from `Batch.tokens`)."""
    reset = _ROUTING_TOKENS.set(mask)
    try:
        yield
    finally:
        _ROUTING_TOKENS.reset(reset)


def routing_token_mask(shape: tuple[int, ...]) -> jax.Array | None:
    """The `routing_tokens` mask for activations whose token axes are `shape` (`[B, T]`), or None
    when every position counts."""
    mask = _ROUTING_TOKENS.get()
    if mask is not None and mask.shape != tuple(shape):
        raise ValueError(
            f"routing token mask of shape {mask.shape} does not fit activations of token shape "
            f"{tuple(shape)}: a soft prompt cannot be combined with masked routing statistics"
        )
    return mask


def token_cross_entropy(
    logits: Float[Array, "*batch v"], targets: Int[Array, "*batch"]
) -> Float[Array, "*batch"]:
    """Per-token `-log softmax(logits)[target]` in f32, shape of `targets`."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def chunked_token_cross_entropy(
    head: Callable[[Float[Array, "n d"]], Float[Array, "n v"]],
    hidden: Float[Array, "b t d"],
    targets: Int[Array, "b t"],
    chunk: int,
) -> Float[Array, "b t"]:
    r"""`token_cross_entropy(head(hidden), targets)` computed `chunk` tokens at a time.

    The `B·T` token positions are cut into `⌈B·T / chunk⌉` pieces (the last one zero-padded);
    for each piece `CE_t = logsumexp(h_t W) - (h_t W)_{y_t}` is evaluated under `jax.checkpoint`
    inside `lax.map`, so the forward pass keeps only the hidden states and the backward pass
    recomputes one `[chunk, V]` block of logits at a time: peak memory `O(chunk · V)` instead of
    `O(B · T · V)`. Equal to the unchunked cross-entropy up to float rounding.

    head: hidden `[n, d]` -> logits `[n, V]`; hidden: `[B, T, d]`; targets: `int [B, T]`.
    Returns f32 `[B, T]`.
    """
    if chunk < 1:
        raise ValueError(f"ce_chunk must be >= 1 (tokens per chunk) or None, got {chunk}")
    shape = targets.shape
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_t = targets.reshape(-1)
    n = flat_t.shape[0]
    pad = (-n) % chunk
    flat_h = jnp.pad(flat_h, ((0, pad), (0, 0)))
    flat_t = jnp.pad(flat_t, (0, pad))

    @jax.checkpoint
    def piece(args):
        h, t = args
        return token_cross_entropy(head(h), t)

    pieces = (flat_h.reshape(-1, chunk, flat_h.shape[-1]), flat_t.reshape(-1, chunk))
    return jax.lax.map(piece, pieces).reshape(-1)[:n].reshape(shape)


def sum_aux_losses(intermediates: nnx.State) -> jax.Array:
    """Sum of the already-weighted auxiliary losses that modules sowed as `nnx.Intermediate` under
    the name `aux_loss` (e.g. load balancing of a mixture of experts); 0 when none."""
    total = jnp.zeros((), jnp.float32)
    for path, value in nnx.to_flat_state(intermediates):
        if AUX_LOSS in (str(p) for p in path):
            for v in jax.tree.leaves(value):
                total = total + jnp.sum(v)
    return total


def lm_loss(
    graphdef: nnx.GraphDef,
    params: PyTree,
    base: nnx.State,
    batch: Batch,
    rng: jax.Array | None,
    *,
    ce_chunk: int | None = None,
    remat: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`mean_w CE(model(inputs), targets) + Σ aux`; dropout on iff `rng` is given.

    The mean is weighted by `batch.weights` (label masks of prompt tokens get weight 0); routing
    statistics count the tokens of `batch.tokens` (`routing_tokens`; None: every position).
    ce_chunk: tokens per piece of the chunked head + cross-entropy (`chunked_token_cross_entropy`;
    None: all logits at once). remat: rematerialise every block in the backward pass (the
    model's `remat` switch, see `fedjax_lora.models.causal_lm.CausalLM`).
    """
    model = nnx.merge(graphdef, params, base)
    if remat:
        if not hasattr(model, "remat"):
            raise ValueError(
                f"training.remat needs a model with a `remat` switch (CausalLM); "
                f"{type(model).__name__} has none: set training.remat=false"
            )
        model.remat = True
    rngs = None if rng is None else nnx.Rngs(dropout=rng)
    if ce_chunk is None:
        per_token = lambda m, x: token_cross_entropy(m(x, rngs=rngs), batch.targets)
    else:
        per_token = lambda m, x: chunked_token_cross_entropy(
            m.head, m.features(x, rngs=rngs), batch.targets, ce_chunk
        )
    with routing_tokens(batch.tokens):
        ce, intermediates = nnx.capture(per_token, nnx.Intermediate)(model, batch.inputs)
    ce = jnp.sum(ce * batch.weights) / jnp.maximum(jnp.sum(batch.weights), 1.0)
    aux = sum_aux_losses(intermediates)
    return ce + aux, {"ce": ce, "aux": aux}
