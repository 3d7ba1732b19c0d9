r"""Cross-evaluation of N clients' adapters on one shared frozen base, never copying the base.

What the trust rules of Wagner, Fan & Jaggi (COLM 2024) observe:

- `cross_perplexity`: the `N × N` matrix `P[i, j]` = perplexity of client `j`'s model on client
  `i`'s evaluation windows (Strategy 2's input),

  .. math:: P[i, j] = \exp\Big(\frac{\sum_{w,t} \omega^i_{w,t}\, \mathrm{CE}_j(x^i_w)_t}
     {\sum_{w,t} \omega^i_{w,t}}\Big),

  the token-mean cross-entropy of the fixed windows `x^i` with weights `ω^i` (`EvalSet`); the
  reference's `exp(mean of batch-mean CE)` over full random batches is the same quantity on its
  own random windows;
- `reference_logits`: every client's logits at the **last position** of each shared reference
  sequence, `[N, S, V]` (Strategy 3's input).

Models are mapped by the engine's `Strategy` (`map`/`chunked` bound the memory to one or a chunk
of clients); for each model, the `N` data sets and the reference sequences are walked by
`lax.map`, `batch_size` windows at a time. The base is an argument of the one jitted program and
is shared by every client.

`attention_dropout_only` reproduces the reference's evaluation quirk (spec §3.1): its
`scaled_dot_product_attention(..., dropout_p=0.2)` keeps attention-probability dropout on in eval
mode, while all other dropouts are off.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from flax import nnx

from fedjax_lora import lora
from fedjax_lora.engine.evaluate import EvalSet, make_client_eval, summarize
from fedjax_lora.engine.strategy import Strategy, map_clients
from fedjax_lora.models.config import ModelConfig

PyTree = Any

__all__ = [
    "CrossEval",
    "attention_dropout_only",
    "make_cross_eval",
]


def attention_dropout_only(
    graphdef: nnx.GraphDef, template: nnx.State, base: nnx.State, rate: float | None = None
):
    """A graphdef of the same model whose only active dropout is attention-probability dropout
    at `rate` (default: the model's `attn_dropout`; embedding, residual and LoRA dropout rates
    set to 0). Call it with `rngs` to get the reference's evaluation mode; the state layout
    (adapters, base) is unchanged."""
    model = nnx.merge(graphdef, template, base)
    for _, module in nnx.iter_graph(model):
        if not isinstance(module, nnx.Module):
            continue
        for name, value in list(vars(module).items()):
            if isinstance(value, ModelConfig):
                attn = value.attn_dropout if rate is None else rate
                setattr(module, name, dataclasses.replace(value, dropout=0.0, attn_dropout=attn))
        if isinstance(module, lora.LoRA):
            module.dropout = 0.0
    return lora.split(model)[0]


class CrossEval(NamedTuple):
    """Cross-evaluation functions (call inside `jit`).

    client_eval: the per-(model, data) evaluation, `make_client_eval`'s contract; the trust
      algorithms also use it for their reported evaluation, so `P[i, i]` is client `i`'s own
      reported perplexity.
    perplexity: `(params [N], eval_set, base) -> f32 [N, N]`, `P[i, j]` = model `j` on data `i`.
    reference_logits: `(params [N], reference int32 [S, T], base) -> f32 [N, S, V]`.
    """

    client_eval: Callable
    perplexity: Callable[[PyTree, EvalSet, nnx.State], jax.Array]
    reference_logits: Callable[[PyTree, jax.Array, nnx.State], jax.Array]


def make_cross_eval(
    graphdef: nnx.GraphDef,
    batch_size: int,
    strategy: Strategy = Strategy(),
    *,
    dropout_key: jax.Array | None = None,
) -> CrossEval:
    """Cross-evaluation of stacked adapters on one base.

    dropout_key: evaluation-time dropout (use a graphdef from `attention_dropout_only` for the
    reference's quirk); batch `b` of every evaluation uses `fold_in(dropout_key, b)`, so the same
    windows see the same masks whichever model evaluates them.
    """
    client_eval = make_client_eval(graphdef, batch_size, dropout_key)

    def model_on_every_set(params, windows, weights, base):
        sums = jax.lax.map(lambda wd: client_eval(params, wd[0], wd[1], base), (windows, weights))
        return summarize(sums)["ppl"]

    def perplexity(params: PyTree, eval_set: EvalSet, base: nnx.State) -> jax.Array:
        shared = (eval_set.windows, eval_set.weights, base)
        by_model = map_clients(model_on_every_set, strategy, (params,), shared)  # [j, i]
        return by_model.T

    def last_logits(params, reference, base):
        model = nnx.merge(graphdef, params, base)

        def one(args):
            seq, s = args
            rngs = None
            if dropout_key is not None:
                rngs = nnx.Rngs(dropout=jax.random.fold_in(dropout_key, s))
            return model(seq[None], rngs=rngs)[0, -1]

        idx = jax.numpy.arange(reference.shape[0])
        return jax.lax.map(one, (reference, idx), batch_size=batch_size)

    def reference_logits(params: PyTree, reference: jax.Array, base: nnx.State) -> jax.Array:
        return map_clients(last_logits, strategy, (params,), (reference, base))

    return CrossEval(client_eval, perplexity, reference_logits)
