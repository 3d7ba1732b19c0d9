r"""FDLoRA: personalized federated learning with dual LoRA tuning (Qi et al., arXiv:2406.07925), as
the FedAMoLE reference runs it (`zyc140345/FedAMoLE`, `train_baselines.py`, `baselines/node.py`,
`baselines/trainer.py`, `baselines/fdlora.py`) and, with `COMIGS`, as the CoMiGS reference does
(`epfml/CoMiGS`, `collab_run_client_fd_lora.py`).

Every client holds a *shared* LoRA `θ` (the problem's adapters, trained every round) and a
*private* LoRA `π`; the server holds the global LoRA `θ_s` and an outer optimizer. With
`L = local_rounds` and rounds `r = 0, 1, …` (0-based):

1. rounds `r < L` (the reference's round −1, `L = 1`): local training only; at `r = L − 1` the
   server averages, `θ_s = (1/N) Σ_c θ_c`, and creates the outer optimizer (the reference: SGD,
   learning rate 1, Nesterov momentum 0.5);
2. rounds `r ≥ L`: every client trains `θ` from `θ_s`; when `(r − L) mod sync_every = 0` it copies
   the trained `θ_c` into `π_c` (the reference: rounds 0, 5, 10, …); the server takes one outer
   step on the pseudo-gradient `g = (1/N) Σ_c (θ_s − θ_c) = θ_s − mean_c θ_c` (outer learning
   rate 1 and no momentum is FedAvg);
3. adaptive fusion (LoRAHub-style): each client searches `w ∈ [−b, b]²` minimising
   `loss_c(w₁ θ_s + w₂ π_c) + λ · mean|w|` (`λ = 0.05`) on its fusion windows, where the fused
   adapter combines the two LoRAs *elementwise* (A and B separately, not the product); the fused
   adapter is the client's personalised model (evaluated; `aux["personal"]`). It does not feed
   back into training: the next round starts again from `θ_s`.

**The federated toolbox** (`docs/aggregation.md`): the mean `(1/N) Σ_c θ_c` above is the
global part's rule; `aggregation.reduction` or `aggregation.dp` replaces it by a robust consensus
or DP-FedAvg of the shared LoRAs (clipped relative to `θ_s`, the tree they trained from), which
the outer optimizer then steps towards (`ServerProgram.global_part`); nothing is applied in the
local rounds `r < L − 1`. The private and fused adapters never leave the client.

| `server_opt` | `proximal_mu` | `scaffold` | `reduction` | `dp` |
|---|---|---|---|---|
| – (its own outer optimizer) | – | – | ✓ shared LoRA | ✓ shared LoRA |

In the rounds `r < L` the clients' local adapters are evaluated. Local training is the problem's;
with `round_decay` (the FedAMoLE reference: AdamW, 0.99) the problem's optimizer is re-created
every round with its step scaled by `round_decay^r`, as in `fedamole`.

Fusion search, and where it deviates from the references: they run nevergrad's `NGOpt` from
`w = (0, 0)` with a budget of 5 (FedAMoLE; `b = 1.5`, the loss is the mean over 5 auxiliary
batches of one sequence, the next 5 of a cycling loader at every evaluation) or 10 (CoMiGS;
`b = 1`, one fresh random validation batch of 64 windows per evaluation, run once after the last
round). Here the search is a fixed candidate set of the same budget, evaluated on the same fixed
windows for every candidate (the first `fusion_windows` windows of the evaluation set
`fusion_set`, token-weighted mean cross-entropy), vectorized over clients (the problem's
strategy) and `lax.map`-ped over candidates: `random` is `(0, 0)` followed by `budget − 1` points
drawn uniformly per client and round; `grid` is the `g × g` grid `linspace(−b, b, g)²` with
`g² = budget`. The CoMiGS reference fuses only the MLP-expert LoRAs; here every adapter of the
problem is fused.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lora.aggregation import Aggregator, fedavg
from fedjax_lora.algorithms.base import (
    Algorithm,
    Capabilities,
    ClientProgram,
    GlobalPart,
    Method,
    RoundInputs,
    ServerProgram,
    build,
    exchanged,
    round_decayed,
    scaled_tx,
    standard_client,
)
from fedjax_lora.algorithms.problem import Problem, SideData
from fedjax_lora.algorithms.registry import register
from fedjax_lora.engine.evaluate import make_client_eval
from fedjax_lora.engine.state import ClientState
from fedjax_lora.engine.strategy import map_clients
from fedjax_lora.typing import PyTree

__all__ = [
    "COMIGS",
    "FDLoRAOptions",
    "FDLoRAServer",
    "fdlora",
    "fdlora_comigs",
    "fuse",
    "fusion_candidates",
    "fusion_search",
]


@dataclasses.dataclass(frozen=True)
class FDLoRAOptions:
    """FDLoRA's schedule, outer optimizer and fusion search (defaults: the FedAMoLE reference).

    local_rounds: `L`, rounds of local training before the first average (0: FedAvg from the
      shared initial adapters). sync_every: the private adapter takes the trained shared one every
      that many rounds. outer_lr, outer_momentum, nesterov: the server's SGD on the
      pseudo-gradient. fusion_set: the window set holding the fusion windows (`aux`: the
      reference's auxiliary split, the side data `fdlora` declares, by default 5 % of every
      client's training tokens; or an evaluation set, e.g. `val`); fusion_windows: how many of
      its windows; fusion_budget: candidate weight pairs per client; fusion_bound: `b`;
      fusion_search: `random` or `grid`; l1: `λ`. round_decay: re-create the optimizer every
      round with the step scaled by `round_decay^r` (None: the optimizer state persists across
      rounds).
    """

    local_rounds: int = 1
    sync_every: int = 5
    outer_lr: float = 1.0
    outer_momentum: float = 0.5
    nesterov: bool = True
    fusion_set: str = "aux"
    fusion_windows: int = 5
    fusion_budget: int = 5
    fusion_bound: float = 1.5
    fusion_search: Literal["random", "grid"] = "random"
    l1: float = 0.05
    round_decay: float | None = 0.99

    def __post_init__(self):
        for name in ("sync_every", "fusion_windows", "fusion_budget"):
            if getattr(self, name) < 1:
                raise ValueError(f"FDLoRAOptions.{name} must be >= 1, got {getattr(self, name)}")
        if self.local_rounds < 0:
            raise ValueError(f"local_rounds must be >= 0, got {self.local_rounds}")
        if self.fusion_bound <= 0:
            raise ValueError(f"fusion_bound must be positive, got {self.fusion_bound}")
        if self.fusion_search not in ("random", "grid"):
            raise ValueError(
                f"fusion_search must be 'random' or 'grid', got {self.fusion_search!r}"
            )
        if (
            self.fusion_search == "grid"
            and math.isqrt(self.fusion_budget) ** 2 != self.fusion_budget
        ):
            raise ValueError(
                f"a grid search needs a square fusion_budget (g × g points), got "
                f"{self.fusion_budget}"
            )
        if self.round_decay is not None and self.round_decay <= 0:
            raise ValueError(f"round_decay must be positive or None, got {self.round_decay}")
        if not 0.0 <= self.outer_momentum < 1.0:
            raise ValueError(f"outer_momentum must be in [0, 1), got {self.outer_momentum}")


COMIGS = FDLoRAOptions(
    local_rounds=0,
    sync_every=1,
    outer_momentum=0.0,
    nesterov=False,
    fusion_set="val",
    fusion_windows=64,
    fusion_budget=10,
    fusion_bound=1.0,
    round_decay=None,
)
"""The CoMiGS reference: FedAvg from the shared init, the private LoRA is the client's last
locally trained one, fusion on 64 validation windows, budget 10, `w ∈ [−1, 1]²`; the optimizer
state persists across rounds."""


class FDLoRAServer(NamedTuple):
    """`SimState.agg_state` of FDLoRA: the global LoRA `θ_s` (no client axis), the outer
    optimizer's state, the key of the random fusion candidates, and the state of the rule that
    replaces the mean (`()` for the mean)."""

    params: PyTree
    opt_state: PyTree
    key: jax.Array
    rule: PyTree = ()


def fusion_candidates(key: jax.Array, num_clients: int, options: FDLoRAOptions) -> jax.Array:
    """`f32 [N, K, 2]` weight pairs `(w_shared, w_private)` per client (module docstring)."""
    b, k = options.fusion_bound, options.fusion_budget
    if options.fusion_search == "grid":
        axis = jnp.linspace(-b, b, math.isqrt(k))
        grid = jnp.stack(jnp.meshgrid(axis, axis, indexing="ij"), -1).reshape(k, 2)
        return jnp.broadcast_to(grid, (num_clients, k, 2))
    drawn = jax.random.uniform(key, (num_clients, k - 1, 2), minval=-b, maxval=b)
    return jnp.concatenate([jnp.zeros((num_clients, 1, 2)), drawn], axis=1)


def fuse(shared: PyTree, private: PyTree, w: jax.Array) -> PyTree:
    """`w₀ · shared + w₁ · private` on every leaf (A and B separately)."""
    return jax.tree.map(lambda s, p: (w[0] * s + w[1] * p).astype(s.dtype), shared, private)


def fusion_search(
    loss: Callable[[PyTree], jax.Array],
    shared: PyTree,
    private: PyTree,
    candidates: jax.Array,
    l1: float,
) -> tuple[jax.Array, jax.Array]:
    """One client's search: `score_k = loss(fuse(shared, private, w_k)) + l1 · mean|w_k|` for
    every candidate `w_k` of `candidates [K, 2]` (`lax.map`); returns `(w_best [2], scores [K])`
    with `w_best` the first candidate of lowest score."""
    scores = jax.lax.map(
        lambda w: loss(fuse(shared, private, w)) + l1 * jnp.mean(jnp.abs(w)), candidates
    )
    return candidates[jnp.argmin(scores)], scores


def fdlora(
    problem: Problem, options: FDLoRAOptions = FDLoRAOptions(), *, name: str = "fdlora"
) -> Algorithm:
    """FDLoRA: a private and a global LoRA per client, fused by a gradient-free search on the
    client's auxiliary data (declared side data: the reference's 5 % auxiliary split).

    `ClientState.params` is the shared LoRA; `aux["private"]` the private one and
    `aux["personal"]` the fused one each client is evaluated with. Metrics per round: `train`,
    every evaluation set (the fused adapters; the local ones in the first `local_rounds` rounds)
    and `aggregation`: `applied` (a server average or step happened), `fusion_weights [N, 2]`,
    `fusion_scores [N, K]`, `fusion_candidates [N, K, 2]` (zeros before the first fusion); the
    run's `metrics.jsonl` holds them as `<name>/fusion_weights` etc.
    """
    if problem.cohort is not None:
        raise ValueError("FDLoRA trains every client every round; unset data.cohort_size")
    fusion_set = problem.windows(options.fusion_set)
    if fusion_set is None:
        raise ValueError(
            f"FDLoRA's fusion needs the window set {options.fusion_set!r}; hold the auxiliary "
            "data out of training with data.aux_fraction > 0 (the reference: 0.05), or set "
            "FDLoRAOptions.fusion_set to 'val'"
        )
    n, big_l, k = problem.num_clients, options.local_rounds, options.fusion_budget
    decay = options.round_decay
    tx = problem.tx() if decay is None else scaled_tx(problem)
    outer = optax.sgd(
        options.outer_lr, momentum=options.outer_momentum or None, nesterov=options.nesterov
    )
    client_eval = make_client_eval(problem.graphdef, problem.eval_batch_size)

    # The first `fusion_windows` windows, cut at a multiple of the evaluation batch size.
    eb, available = problem.eval_batch_size, fusion_set.windows.shape[1]
    m = min(-(-options.fusion_windows // eb) * eb, available)
    keep = (jnp.arange(m) < options.fusion_windows).astype(jnp.float32)

    def search_one(private, candidates, win, wt, shared, base):
        def loss(params):
            sums = client_eval(params, win, wt, base)
            return sums["ce_sum"] / jnp.maximum(sums["tokens"], 1.0)

        w, scores = fusion_search(loss, shared, private, candidates, options.l1)
        return fuse(shared, private, w), w, scores

    standard = standard_client(problem, shared_init=True, tx=tx)

    def init(key: jax.Array) -> ClientState:
        clients = standard.init(jax.random.split(key)[0])
        return clients._replace(aux={"private": clients.params, "personal": clients.params})

    def server_of(rule: Aggregator | None) -> ServerProgram:
        """The server whose consensus of the shared LoRAs is `rule`'s (a `GlobalRule` over every
        adapter, clipping relative to `θ_s` under DP) instead of their mean; None: the mean."""

        def server_init(key: jax.Array, clients: ClientState) -> FDLoRAServer:
            shared = jax.tree.map(lambda x: x[0], clients.params)
            state = () if rule is None else rule.init(clients.params)
            return FDLoRAServer(shared, outer.init(shared), jax.random.split(key)[1], state)

        def server_apply(clients: ClientState, server: FDLoRAServer, inputs: RoundInputs):
            r, base = inputs.round, inputs.base
            trained = clients.params
            phase = jnp.where(r < big_l - 1, 0, jnp.where(r == big_l - 1, 1, 2))
            if rule is None:
                mean = jax.tree.map(lambda x: x[0], fedavg(trained))
            else:

                def consensus(state):
                    ruled, state = rule.apply(trained, state, {"global": server.params})
                    return jax.tree.map(lambda x: x[0], ruled), state

                skip = lambda state: (server.params, state)  # local rounds: nothing aggregated
                mean, state = jax.lax.cond(phase >= 1, consensus, skip, server.rule)
                server = server._replace(rule=state)

            def first_average(server):
                return server._replace(params=mean, opt_state=outer.init(mean))

            def outer_step(server):
                grad = jax.tree.map(jnp.subtract, server.params, mean)
                updates, opt_state = outer.update(grad, server.opt_state, server.params)
                return server._replace(
                    params=optax.apply_updates(server.params, updates), opt_state=opt_state
                )

            server = jax.lax.switch(phase, [lambda s: s, first_average, outer_step], server)
            params = jax.tree.map(
                lambda t, s: jnp.where(phase == 0, t, jnp.broadcast_to(s, t.shape)),
                trained,
                server.params,
            )
            sync = (phase == 2) & ((r - big_l) % options.sync_every == 0)
            private = jax.tree.map(
                lambda p, t: jnp.where(sync, t, p), clients.aux["private"], trained
            )
            windows, weights = inputs.windows(options.fusion_set)
            fusion_data = (windows[:, :m], weights[:, :m] * keep[None, :, None])

            def fused(_):
                cands = fusion_candidates(jax.random.fold_in(server.key, r), n, options)
                personal, w, scores = map_clients(
                    search_one,
                    problem.strategy,
                    (private, cands, *fusion_data),
                    (server.params, base),
                )
                return personal, w, scores, cands

            def local(_):
                zeros = jnp.zeros((n, k, 2), jnp.float32)
                return trained, zeros[:, 0], zeros[..., 0], zeros

            personal, w, scores, cands = jax.lax.cond(phase == 2, fused, local, None)
            metrics = {
                "applied": phase >= 1,
                "fusion_weights": w,
                "fusion_scores": scores,
                "fusion_candidates": cands,
            }
            aux = {"private": private, "personal": personal}
            return clients._replace(params=params, aux=aux), server, metrics, None

        return ServerProgram(
            server_init,
            server_apply,
            comm=exchanged("all"),
            global_part=GlobalPart("all", server_of),
        )

    client = ClientProgram(init, standard.update)
    if decay is not None:
        client = round_decayed(client, tx, decay)
    method = Method(
        name,
        client,
        server_of(None),
        evaluate=lambda trained, aggregated: aggregated.aux["personal"],
        capabilities=Capabilities(cohorts=False),
    )
    return build(problem, method)


def fdlora_comigs(problem: Problem, options: FDLoRAOptions = COMIGS) -> Algorithm:
    """FDLoRA as the CoMiGS reference runs it: FedAvg, then each client fuses its last local LoRA
    with the global one (`COMIGS`)."""
    return fdlora(problem, options, name="fdlora-comigs")


register("fdlora", fdlora, FDLoRAOptions(), side=SideData(aux=0.05))
register("fdlora-comigs", fdlora_comigs, COMIGS)
