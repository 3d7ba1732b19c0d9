r"""CoMiGS (Fan, Messmer, Doikov & Jaggi, arXiv:2409.13931, ICML 2025): a mixture of generalist and
specialist LoRA experts per MLP (`fedjax_lora.moe`), trained by bi-level alternation, and its
ablations as thin configurations of the same code.

Lower level: the experts (and the attention LoRA) minimise the training loss `CE + λ_LB L_LB` with
AdamW on a cosine schedule (the problem's optimizer). Upper level: each client's router minimises
the same loss on its *validation* split. Alternation (the reference's `GeneralClient.train`): on a
per-client step counter `t` (running across rounds), after expert step `t` with `t mod τ = 0`, `r`
router steps follow (own AdamW, constant rate). The two optimizer states are separate and persist
across rounds; each step differentiates only its own parameters. Aggregation is the uniform mean
of the policy's global tensors (`fedjax_lora.aggregation.masks`); CoMiGS's `expert_0` shares
expert 0 and the attention LoRA, and keeps the specialists and routers local; `server_opt` steps
the global tensors with a server optimizer instead (`aggregation.server_opt`).

`reference_grad_leak=True` reproduces the reference's gradient accumulation (spec §2.4): each
`backward` fills the gradients of experts *and* router, and each optimizer clears only its own,
so the router's first step of a block also applies the sum of all training gradients since its
last step, and the first expert step after a block also applies the block's `r` validation
gradients.

Router batches (`router_batches`): `"random"` (default, the reference's `get_batch`): windows at
uniformly random offsets, with replacement, over the client's whole validation stream (rebuilt
from its validation windows, which must cover it: `eval.max_windows` at least the stream's
windows); `"windows"`: whole windows drawn from the fixed validation windows.

Evaluation (`evaluate`): `"local"` (default), each client's model after its local steps and before
the server average, as the reference evaluates inside `GeneralClient.train` (spec §2.5);
`"aggregated"`: after aggregation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fedjax_lora.aggregation.masks import Policy, global_mask, masked_aggregator
from fedjax_lora.aggregation.masks import trainable as policy_trains
from fedjax_lora.algorithms.base import (
    Algorithm,
    Capabilities,
    ClientProgram,
    Evaluate,
    Method,
    RoundInputs,
    SimState,
    aggregating,
    build,
)
from fedjax_lora.algorithms.problem import Problem, Surgery, install
from fedjax_lora.algorithms.registry import register
from fedjax_lora.engine.batches import Batch
from fedjax_lora.engine.loss import lm_loss
from fedjax_lora.engine.optim import OptimizerConfig
from fedjax_lora.engine.state import ClientState, client_model_state
from fedjax_lora.engine.strategy import map_clients
from fedjax_lora.engine.train import accumulate_gradients, stream_sampler
from fedjax_lora.lora import init_adapters
from fedjax_lora.models.layers import Adapter
from fedjax_lora.moe import MoEConfig, Router, install_moe, routing_analysis, set_expert_counts
from fedjax_lora.settings import ServerOptimizer

__all__ = [
    "BiLevel",
    "CoMiGSOptions",
    "comigs",
    "moe_surgery",
    "routing_record",
    "val_sampler",
    "val_stream",
    "with_moe",
]


@dataclasses.dataclass(frozen=True)
class BiLevel:
    """How experts and routers are trained.

    alternating: bi-level alternation; False: one optimizer (the problem's) over experts and
        routers on the training split (pFedMoE, Local-MoE, FedAvg-MoE).
    router_every, router_steps: `τ` and `r` (the reference: 30 and 10).
    router_split: `"val"` (CoMiGS) or `"train"` (the `-tr` ablations).
    router_optimizer: AdamW with a constant rate (the reference: 2e-3, β = (0.9, 0.95), wd 0.01).
    reference_grad_leak: reproduce the reference's gradient accumulation (module docstring).
    """

    alternating: bool = True
    router_every: int = 30
    router_steps: int = 10
    router_split: Literal["val", "train"] = "val"
    router_optimizer: OptimizerConfig = OptimizerConfig(lr=2e-3, weight_decay=0.01)
    reference_grad_leak: bool = False

    def __post_init__(self):
        if self.router_every < 1 or self.router_steps < 1:
            raise ValueError("router_every and router_steps must be >= 1")
        if self.router_split not in ("val", "train"):
            raise ValueError(f"router_split must be 'val' or 'train', got {self.router_split!r}")


def val_sampler(windows: jax.Array, weights: jax.Array, batch_size: int):
    """`sample(key, counter) -> Batch`: `batch_size` windows drawn uniformly with replacement
    from one client's fixed validation windows `[W, T+1]` (padding windows excluded)."""
    valid = jnp.log((weights.sum(-1) > 0).astype(jnp.float32))

    def sample(key, counter):
        del counter
        idx = jax.random.categorical(key, valid, shape=(batch_size,))
        win = windows[idx]
        return Batch(win[:, :-1], win[:, 1:], weights[idx])

    return sample


def val_stream(windows: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(tokens [W·T + 1], length, mask)`: the stream that one client's fixed validation windows
    `[W, T+1]` (stride `T`, valid windows first, `fedjax_lora.data.streams.eval_windows`) cover;
    `mask[p]` is the weight of token `p` as a target."""
    t = windows.shape[-1] - 1
    n = jnp.sum(weights.sum(-1) > 0)
    tokens = jnp.concatenate([windows[:, :-1].reshape(-1), jnp.zeros((1,), windows.dtype)])
    tokens = tokens.at[n * t].set(windows[jnp.maximum(n - 1, 0), t])
    mask = jnp.concatenate([jnp.zeros((1,), weights.dtype), weights.reshape(-1)])
    return tokens, n * t + 1, mask


def _check_val_covers_stream(val) -> None:
    """Raises unless every client's valid validation windows are consecutive pieces of one stream
    (each window starts with the previous window's last token), as `router_batches="random"`
    needs. Traced windows (the factory inside a vectorized sweep) are not checked here: the sweep
    builds every level's method on its concrete data first, which checks them."""
    if isinstance(val.windows, jax.core.Tracer):
        return
    windows, weights = np.asarray(val.windows), np.asarray(val.weights)
    for i in range(windows.shape[0]):
        n = int(np.sum(weights[i].sum(-1) > 0))
        if np.any(windows[i, : n - 1, -1] != windows[i, 1:n, 0]):
            raise ValueError(
                f"comigs router_batches='random' samples client {i}'s whole validation stream, "
                "but its validation windows do not cover it; raise eval.max_windows to the "
                "stream's window count or set method_options.<method>.router_batches=windows"
            )


def with_moe(problem: Problem, moe: MoEConfig | None = None) -> Problem:
    """The problem with its model's MLPs replaced by `moe` mixtures (default `MoEConfig()`;
    `install_moe` through `install`: MLP LoRA is replaced by the experts, attention LoRA stays);
    its `frozen` template holds the `ExpertMask`s (every slot on). The problem's `graphdef` and
    `base` run a CoMiGS client's adapters with its frozen state merged in, e.g. for
    `fedjax_lora.moe.routing`."""
    return install(problem, moe_surgery(moe or MoEConfig()))


def moe_surgery(moe: MoEConfig) -> Surgery:
    """The surgery replacing a model's MLPs by `moe` mixtures (`install_moe`)."""
    return lambda model: install_moe(model, moe)


@dataclasses.dataclass(frozen=True)
class CoMiGSOptions:
    """The mixture, what is shared, and how experts and routers are trained.

    moe: the MLP mixtures (default `MoEConfig()`; any MLP LoRA of the problem is replaced by the
      experts, the attention LoRA stays).
    expert_counts: client `i` uses `expert_counts[i] ≤ moe.num_experts` experts (default all;
      1GXS).
    policy: what the server averages (`fedjax_lora.aggregation.masks`).
    schedule: the bi-level alternation (`BiLevel`).
    router_batches, evaluate: module docstring.
    reference_lb_on_block_output: `MoEConfig.reference_lb_on_block_output` (either turns it on).
    server_opt: a server optimizer on the averaged (global) part (`aggregation.server_opt`).
    """

    moe: MoEConfig | None = None
    expert_counts: tuple[int, ...] | None = None
    policy: Policy = "expert_0"
    schedule: BiLevel = BiLevel()
    router_batches: Literal["random", "windows"] = "random"
    reference_lb_on_block_output: bool = False
    evaluate: Evaluate = "local"
    server_opt: ServerOptimizer = ServerOptimizer()

    @property
    def mixture(self) -> MoEConfig:
        """The MLP mixtures these options install: `moe` (default `MoEConfig()`), with
        `reference_lb_on_block_output` when either sets it."""
        moe = self.moe or MoEConfig()
        if self.reference_lb_on_block_output:
            moe = dataclasses.replace(moe, reference_lb_on_block_output=True)
        return moe

    def __post_init__(self):
        if self.router_batches not in ("random", "windows"):
            raise ValueError(
                f"router_batches must be 'random' or 'windows', got {self.router_batches!r}"
            )


def comigs(
    problem: Problem, options: CoMiGSOptions = CoMiGSOptions(), *, name: str = "comigs"
) -> Algorithm:
    """CoMiGS on `problem` (`CoMiGSOptions`): its model's MLPs become mixtures of LoRA experts,
    clients use their number of experts, and the policy decides what the server averages (with
    `server_opt`, a server optimizer steps it: `aggregation.server_opt`).

    Every client starts from the same global tensors (the server's init) and its own draw of the
    local ones. Metrics: the generic round's and the training cross-entropy `train_ce [N, steps]`
    (without the load-balancing term). The last round's record holds the routing analysis of the
    final clients as `routing` (`routing_record`).
    """
    expert_counts, policy, schedule = options.expert_counts, options.policy, options.schedule
    router_batches, evaluate = options.router_batches, options.evaluate
    moe = options.mixture
    moe_problem = with_moe(problem, moe)
    graphdef, template = moe_problem.graphdef, moe_problem.template
    n = problem.num_clients
    counts = np.full(n, moe.num_experts) if expert_counts is None else np.asarray(expert_counts)
    if counts.shape != (n,) or counts.min() < 1 or counts.max() > moe.num_experts:
        raise ValueError(
            f"expert_counts must give 1..{moe.num_experts} experts for each of {n} clients, "
            f"got {expert_counts}"
        )
    router_on_val = schedule.alternating and schedule.router_split == "val"
    if router_on_val and "val" not in problem.eval_sets:
        raise ValueError("the router trains on the validation split, but the problem has no 'val'")
    if router_on_val and router_batches == "random":
        _check_val_covers_stream(problem.eval_sets["val"])
    cfg = problem.training
    tx = problem.tx()
    rtx = schedule.router_optimizer.build()
    max_windows = problem.train.max_windows(cfg.seq_len)

    def expert_filter(path, value):
        if isinstance(value, Router):
            return not schedule.alternating
        return isinstance(value, Adapter) and policy_trains(path, value, policy)

    groups = (expert_filter, Router) if schedule.alternating else (expert_filter,)

    def init_state(key: jax.Array) -> ClientState:
        k_own, k_shared, k_rng, k_data = jax.random.split(key, 4)
        own = jax.vmap(init_adapters, in_axes=(None, 0))(template, jax.random.split(k_own, n))
        shared = init_adapters(template, k_shared)
        mask = global_mask(own, policy)
        params = jax.tree.map(lambda m, s, o: jnp.where(m, s[None], o), mask, shared, own)
        frozen = jax.vmap(set_expert_counts, in_axes=(None, 0))(
            moe_problem.frozen, jnp.asarray(counts)
        )
        parts = jax.vmap(lambda p: nnx.split_state(p, *groups, ...)[:-1])(params)
        opt_state = jax.vmap(lambda *ps: (tx.init(ps[0]), *(rtx.init(p) for p in ps[1:])))(*parts)
        aux = {}
        if schedule.reference_grad_leak:
            aux["pending"] = jax.tree.map(jnp.zeros_like, parts)
        zeros = jnp.zeros((n,), jnp.int32)
        clients = ClientState(
            params,
            opt_state,
            jax.random.split(k_rng, n),
            jax.random.split(k_data, n),
            zeros,
            zeros,
            aux,
            frozen,
        )
        return problem.strategy.place(clients)

    def client_update(client, tokens, length, mask, windows, weights, base, t0):
        train = stream_sampler(cfg, tokens, length, mask, client.data_key, max_windows)
        router_data = train
        if schedule.router_split == "val" and router_batches == "windows":
            router_data = val_sampler(windows, weights, cfg.batch_size)
        elif schedule.router_split == "val":
            v_tokens, v_length, v_mask = val_stream(windows, weights)
            random_cfg = dataclasses.replace(cfg, sampling="random")
            router_data = stream_sampler(
                random_cfg, v_tokens, v_length, v_mask, client.data_key, max_windows
            )
        leak = schedule.reference_grad_leak

        def gradients(params, own, sample, counter, rng):
            """Gradients of every group (leak) or of group `own` alone (clean)."""
            rng, k_batch, k_drop = jax.random.split(rng, 3)
            parts = nnx.split_state(params, *groups, ...)
            diff = parts[:-1] if leak else (parts[own],)
            rest = parts[-1:] if leak else tuple(p for i, p in enumerate(parts) if i != own)

            def value_and_grad(diff, batch, r):
                loss = lambda d: lm_loss(graphdef, nnx.merge_state(*d, *rest), base, batch, r)
                return jax.value_and_grad(loss, has_aux=True)(diff)

            grads, counter, loss, ce = accumulate_gradients(
                value_and_grad, diff, sample, counter, k_batch, k_drop, cfg
            )
            return parts, grads, counter, rng, loss, ce

        def update(state, own, sample, counter):
            """One optimizer step of group `own` (0: experts, 1: router)."""
            params, opt, rng, pending = state
            parts, grads, counter, rng, loss, ce = gradients(params, own, sample, counter, rng)
            if leak:
                grads = jax.tree.map(jnp.add, grads, pending)
                pending = tuple(
                    jax.tree.map(jnp.zeros_like, g) if i == own else g for i, g in enumerate(grads)
                )
                grads = grads[own]
            else:
                grads = grads[0]
            updates, new_opt = (tx if own == 0 else rtx).update(grads, opt[own], parts[own])
            new = optax.apply_updates(parts[own], updates)
            params = nnx.merge_state(params, new)
            opt = tuple(new_opt if i == own else o for i, o in enumerate(opt))
            return (params, opt, rng, pending), counter, loss, ce

        def router_block(state):
            def router_step(state, _):
                state, _, loss, _ = update(state, 1, router_data, jnp.int32(0))
                return state, loss

            return jax.lax.scan(router_step, state, None, length=schedule.router_steps)[0]

        def step(carry, s):
            state, counter = carry
            state, counter, loss, ce = update(state, 0, train, counter)
            if schedule.alternating:
                t = t0 + s + 1
                due = t % schedule.router_every == 0
                state = jax.lax.cond(due, router_block, lambda st: st, state)
            return (state, counter), (loss, ce)

        pending = client.aux.get("pending", ())
        state = (client.params, client.opt_state, client.rng, pending)
        (state, counter), (loss, ce) = jax.lax.scan(
            step, (state, client.windows_seen), jnp.arange(cfg.steps)
        )
        params, opt, rng, pending = state
        aux = {"pending": pending} if leak else {}
        client = client._replace(
            params=params,
            opt_state=opt,
            rng=rng,
            step=client.step + cfg.steps,
            windows_seen=counter,
            aux=aux,
        )
        return client, {"train_loss": loss, "train_ce": ce}

    def local_update(clients: ClientState, inputs: RoundInputs):
        data, eval_sets, base = inputs.data, inputs.eval_sets, inputs.base
        val = eval_sets.get("val") or next(iter(eval_sets.values()))
        masked = data.mask is not None

        def fn(client, tokens, length, *rest):
            mask, rest = (rest[0], rest[1:]) if masked else (None, rest)
            windows, weights, base, t0 = rest
            base = nnx.merge_state(base, client.frozen)
            return client_update(client, tokens, length, mask, windows, weights, base, t0)

        per_client = (clients, data.tokens, data.lengths, *((data.mask,) if masked else ()))
        per_client = (*per_client, val.windows, val.weights)
        return map_clients(fn, problem.strategy, per_client, (base, inputs.round * cfg.steps))

    method = Method(
        name,
        ClientProgram(init_state, local_update),
        aggregating(masked_aggregator(policy), policy=policy, server_opt=options.server_opt),
        evaluate=evaluate,
        capabilities=Capabilities(cohorts=False),
        analyses=lambda sim, tokenizer: routing_record(moe_problem, sim, tokenizer),
    )
    return build(moe_problem, method)


def routing_record(problem: Problem, sim: SimState, tokenizer, top_k: int = 10) -> dict:
    """`{"routing": ...}`: the routing analysis of a CoMiGS state's clients on their test windows
    (`fedjax_lora.moe.routing_analysis`; `problem` the MoE problem, `with_moe`): blocks,
    generalist shares `[N, L]`, and per client and block the `top_k` most generalist- and
    specialist-routed tokens as `[token, share, count]` (decoded with `tokenizer`, else ids);
    empty for mixtures without routers (one expert per client)."""
    try:
        result = routing_analysis(
            problem.graphdef,
            client_model_state(sim.clients),
            problem.base,
            problem.eval_sets["test"],
            top_k=top_k,
            tokenizer=tokenizer,
            strategy=problem.strategy,
        )
    except ValueError:  # one expert per client: nothing is routed
        return {}
    tokens = lambda per: [[[list(t) for t in block] for block in client] for client in per]
    return {
        "routing": {
            "layers": list(result.layers),
            "shares": np.asarray(result.shares, np.float64).tolist(),
            "generalist_tokens": tokens(result.generalist),
            "specialist_tokens": tokens(result.specialist),
        }
    }


_JOINT = BiLevel(alternating=False)
_ON_TRAIN = BiLevel(router_split="train")

# CoMiGS and its ablations (paper Tables 1 and 4): 1G1S (`comigs`; 1GXS with `expert_counts`),
# two generalists, two specialists, router on the training split, joint training of experts and
# router with the generalist shared (pFedMoE), local, or all shared (FedAvg-MoE).
for _name, _defaults, _doc in (
    (
        "comigs",
        CoMiGSOptions(),
        "CoMiGS: shared generalist + local specialist LoRA experts, bi-level routing",
    ),
    ("comigs-2g", CoMiGSOptions(policy="experts"), "CoMiGS ablation: two generalists"),
    ("comigs-2s", CoMiGSOptions(policy="none"), "CoMiGS ablation: two specialists"),
    (
        "comigs-tr",
        CoMiGSOptions(schedule=_ON_TRAIN),
        "CoMiGS ablation: router trained on the training split",
    ),
    (
        "pfedmoe",
        CoMiGSOptions(schedule=_JOINT),
        "pFedMoE: generalist shared, experts and router trained jointly",
    ),
    (
        "local-moe",
        CoMiGSOptions(policy="none", schedule=_JOINT),
        "Mixture of LoRA experts trained locally, nothing shared",
    ),
    (
        "fedavg-moe",
        CoMiGSOptions(policy="experts", schedule=_JOINT),
        "Mixture of LoRA experts, all experts averaged (FedAvg)",
    ),
):
    register(_name, functools.partial(comigs, name=_name), _defaults, doc=_doc)
