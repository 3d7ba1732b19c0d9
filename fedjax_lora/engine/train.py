"""Local training: K optimizer steps of one client as a `lax.scan`, mapped over clients."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fedjax_lora.engine.batches import Batch, sample_starts, windows_at
from fedjax_lora.engine.loss import lm_loss
from fedjax_lora.engine.state import ClientState
from fedjax_lora.engine.strategy import Strategy, map_clients
from fedjax_lora.settings import LocalTraining

PyTree = Any
LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def training_loss(cfg: LocalTraining) -> LossFn:
    """`lm_loss` with the memory settings of `cfg` (`ce_chunk`, `remat`)."""
    return functools.partial(lm_loss, ce_chunk=cfg.ce_chunk, remat=cfg.remat)


def _tree_zeros(tree: PyTree) -> PyTree:
    return jax.tree.map(jnp.zeros_like, tree)


def stream_sampler(
    cfg: LocalTraining,
    tokens: jax.Array,
    length: jax.Array,
    mask: jax.Array | None,
    data_key: jax.Array,
    max_windows: int,
) -> Callable[[jax.Array, jax.Array], Batch]:
    """`sample(key, counter) -> Batch` of `cfg.batch_size` windows of one client's stream: random
    windows from `key`, or the epoch order of `data_key` at position `counter`."""

    def sample(key: jax.Array, counter: jax.Array) -> Batch:
        starts = sample_starts(
            key if cfg.sampling == "random" else data_key,
            length,
            counter,
            batch_size=cfg.batch_size,
            seq_len=cfg.seq_len,
            max_windows=max_windows,
            sampling=cfg.sampling,
            examples=cfg.packing == "examples",
        )
        return windows_at(tokens, starts, cfg.seq_len, mask)

    return sample


def accumulate_gradients(
    value_and_grad: Callable,
    params: PyTree,
    sample: Callable[[jax.Array, jax.Array], Batch],
    counter: jax.Array,
    k_batch: jax.Array,
    k_drop: jax.Array,
    cfg: LocalTraining,
) -> tuple[PyTree, jax.Array, jax.Array, jax.Array]:
    """`(mean gradient, counter, mean loss, mean CE)` over `cfg.grad_accum` micro-batches (as
    dividing each loss by `grad_accum`). Micro-batch `i` is `sample(fold_in(k_batch, i), counter)`
    with dropout key `fold_in(k_drop, i)` (None when `cfg.dropout` is off), and `counter` advances
    by `batch_size`; `value_and_grad(params, batch, rng) -> ((loss, parts), grads)`."""

    def accumulate(acc, i):
        grads, counter = acc
        batch = sample(jax.random.fold_in(k_batch, i), counter)
        rng = jax.random.fold_in(k_drop, i) if cfg.dropout else None
        (loss, parts), g = value_and_grad(params, batch, rng)
        grads = jax.tree.map(jnp.add, grads, g)
        return (grads, counter + cfg.batch_size), (loss, parts["ce"])

    (grads, counter), (losses, ces) = jax.lax.scan(
        accumulate, (_tree_zeros(params), counter), jnp.arange(cfg.grad_accum)
    )
    grads = jax.tree.map(lambda g: g / cfg.grad_accum, grads)
    return grads, counter, losses.mean(), ces.mean()


def make_client_update(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    cfg: LocalTraining,
    *,
    max_windows: int,
    loss_fn: LossFn | None = None,
) -> Callable:
    """`client_update(client, tokens [L], length, mask [L] | None, base) -> (client, metrics)`
    for one (unstacked) client: `cfg.steps` steps of `lax.scan`, each averaging `grad_accum`
    micro-batch gradients (`accumulate_gradients`). loss_fn: `(graphdef, params, base, batch,
    rng) -> (loss, parts)`; default `training_loss(cfg)`."""
    loss_fn = loss_fn or training_loss(cfg)
    value_and_grad = jax.value_and_grad(
        lambda p, base, batch, rng: loss_fn(graphdef, p, base, batch, rng), has_aux=True
    )

    def client_update(client: ClientState, tokens, length, mask, base):
        sample = stream_sampler(cfg, tokens, length, mask, client.data_key, max_windows)
        grad_fn = lambda p, batch, rng: value_and_grad(p, base, batch, rng)

        def step(carry, _):
            params, opt_state, rng, counter = carry
            rng, k_batch, k_drop = jax.random.split(rng, 3)
            grads, counter, loss, ce = accumulate_gradients(
                grad_fn, params, sample, counter, k_batch, k_drop, cfg
            )
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return (params, opt_state, rng, counter), (loss, ce)

        carry = (client.params, client.opt_state, client.rng, client.windows_seen)
        (params, opt_state, rng, counter), (loss, ce) = jax.lax.scan(
            step, carry, None, length=cfg.steps
        )
        client = client._replace(
            params=params,
            opt_state=opt_state,
            rng=rng,
            step=client.step + cfg.steps,
            windows_seen=counter,
        )
        return client, {"train_loss": loss, "train_ce": ce}

    return client_update


def train_clients(
    client_update: Callable,
    strategy: Strategy,
    clients: ClientState,
    tokens: jax.Array,
    lengths: jax.Array,
    mask: jax.Array | None,
    base: nnx.State,
) -> tuple[ClientState, dict[str, jax.Array]]:
    """Runs `client_update` over all clients with the chosen strategy (inside `jit`)."""
    if mask is None:
        fn = lambda c, t, n, b: client_update(c, t, n, None, b)
        return map_clients(fn, strategy, (clients, tokens, lengths), (base,))
    return map_clients(client_update, strategy, (clients, tokens, lengths, mask), (base,))
