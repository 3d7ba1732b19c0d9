r"""FedAMoLE: personalized federated fine-tuning with data-driven heterogeneous mixtures of LoRA
experts (Zhang, Qin, Wu, Hou & Deng, arXiv:2411.19128 v2; reference `zyc140345/FedAMoLE`,
`main.py`, `node.py`).

The model carries an AMoLE module (`fedjax_lora.amole`) on each adapted projection: a pool of `E`
domain experts, a shared expert and a token projection `W_tok`. Every client keeps a full copy of
the pool and, per module, a mask of the experts it holds (`ClientState.frozen`, an
`ExpertMask` state `bool [N, E]` merged over the shared base for each client), so shapes stay
static. Round `r = 1, 2, …` (all clients take part):

1. the Adam state is re-created and the learning rate is `lr · decay^{r-1}` (`round_decay`, 0.99);
2. every client trains its held experts, the shared expert and `W_tok` locally (loss: CE plus
   `0.001 · Σ_modules L_lb`); gradients to experts it does not hold are exactly zero;
3. every client's *local* model is evaluated (the paper's reported metric: after local training,
   before aggregation);
4. with `dispatch="rsea"`, every client computes its RSEA statistics (`amole.make_client_stats`)
   on its auxiliary set with its local parameters, optionally noised (`noise_eta`);
5. aggregation (`aggregation.experts`): each domain expert is averaged over its holders, the shared
   expert and `W_tok` over all clients; every client receives the new global pool;
6. on the host, the next round's masks: `rsea` solves the assignment per module from the uploaded
   statistics (`rsea.scores`, `rsea.assign`); `static` (`fedamole-r`) keeps the random round-0
   architecture; `random` draws a fresh random one.

Communication per client and round (`amole_comm`): up, the parameters it holds (its experts, the
shared expert, `W_tok`) and, with RSEA, its statistics (`t̄ [r]`, `ū [E, r]` in f32 per module);
down, the new averages of what it holds and, unless the architecture is static, its assignment
(`E` bytes per module; counted at the round-0 architecture's holdings).

**The federated toolbox** (`docs/aggregation.md`): the global part is what every client holds,
the shared expert and `W_tok` (`amole.held_by_all`); the server's mean of it can be replaced by
a robust reduction or DP-FedAvg (`aggregation.reduction`, `aggregation.dp`;
`ServerProgram.global_part`) and stepped by a server optimizer (`server_opt`), while each domain
expert stays the mean over its holders. Under DP, `ε` covers the shared expert and `W_tok` only:
the held experts and the RSEA statistics are exchanged without it.

| `server_opt` | `proximal_mu` | `scaffold` | `reduction` | `dp` |
|---|---|---|---|---|
| ✓ shared expert, `W_tok` | – (optimizer re-created every round) | – | ✓ same part | ✓ same part |

Round 0 (`init`): every client starts from the same pool (independent `A` per expert, `B = 0`) and
a random architecture per module (`rsea.random_assignment`). Homogeneous architectures (the
reference's `--homo_arch`) are `min_experts = max_experts = E·k/C`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedjax_lora import amole
from fedjax_lora.aggregation import (
    Aggregator,
    Exchange,
    holder_average,
    rsea,
    with_server_optimizer,
)
from fedjax_lora.aggregation.masks import masked_aggregator, merge_global
from fedjax_lora.algorithms.base import (
    Algorithm,
    Capabilities,
    ClientProgram,
    GlobalPart,
    Method,
    RoundInputs,
    ServerProgram,
    SimState,
    build,
    local_training,
    num_rows,
    round_decayed,
    scaled_tx,
    with_frozen,
)
from fedjax_lora.algorithms.problem import Problem, SideData, Surgery, install, model_of
from fedjax_lora.algorithms.registry import register
from fedjax_lora.engine.state import ClientState, init_clients
from fedjax_lora.engine.strategy import map_clients
from fedjax_lora.engine.train import make_client_update
from fedjax_lora.families import family
from fedjax_lora.lora import detach_adapters
from fedjax_lora.settings import ServerOptimizer
from fedjax_lora.typing import PyTree

__all__ = [
    "FedAMoLEOptions",
    "FedAMoLEServer",
    "amole_comm",
    "amole_surgery",
    "expert_assignment",
    "expert_record",
    "fedamole",
    "fedamole_r",
    "input_weights",
    "with_amole",
]

Dispatch = Literal["rsea", "static", "random"]


@dataclasses.dataclass(frozen=True)
class FedAMoLEOptions:
    """Expert assignment and schedule of FedAMoLE.

    clients_per_expert, min_experts, max_experts: every expert of a module is held by exactly
      `clients_per_expert` clients (the reference's `expert_choices`, 2; 4 in the 20–50-client
      runs), every client holds `min_experts … max_experts` of them (2 … 8).
    aux_set: the window set of the clients' auxiliary data for RSEA (`aux`: the side data
      `fedamole` declares, by default 5 % of every client's training tokens; or an evaluation
      set).
    round_decay: learning-rate factor per round (the optimizer is re-created every round).
    noise_eta: `η` of the optional noise on the uploaded embeddings (`amole.add_noise`); None: off.
    amole: the mixture (pool size, rank, targets) replacing the problem's adapters; None: the
      problem's AMoLE modules, or `with_amole`'s default mixture for a model without any.
    server_opt: a server optimizer on the global part, the shared expert and `W_tok`
      (`aggregation.server_opt`; the domain experts keep their holder average).
    """

    clients_per_expert: int = 2
    min_experts: int = 2
    max_experts: int = 8
    aux_set: str = "aux"
    round_decay: float = 0.99
    noise_eta: float | None = None
    amole: amole.AMoLEConfig | None = None
    server_opt: ServerOptimizer = ServerOptimizer()

    def __post_init__(self):
        if self.noise_eta is not None and self.noise_eta <= 0:
            raise ValueError(f"noise_eta must be positive, got {self.noise_eta}")


class FedAMoLEServer(NamedTuple):
    """`SimState.agg_state` of FedAMoLE: `key`, the PRNG key of the random architectures; `rule`,
    the state of the rule on the global part (`()` for the mean)."""

    key: jax.Array
    rule: PyTree = ()


def input_weights(weights: jax.Array) -> jax.Array:
    """`[..., T]` weights of the *input* tokens of windows from their target weights: input `0`
    counts when the window has any counted target, input `j > 0` when target `j - 1` (token `j`)
    does. With the aux set's all-token weights this is every token of an example (prompt and
    response, the reference's RSEA statistics), padding excluded; a full window counts whole."""
    first = jnp.any(weights > 0, axis=-1, keepdims=True)
    return jnp.concatenate([first, weights[..., :-1] > 0], axis=-1).astype(jnp.float32)


def amole_surgery(config: amole.AMoLEConfig | None = None) -> Surgery:
    """The surgery replacing a model's adapters by AMoLE modules (`amole.add_amole`; default
    `AMoLEConfig` on the family's q and v projections)."""

    def surgery(model: nnx.Module) -> None:
        detach_adapters(model)
        targets = family(model.config.family).amole_targets
        amole.add_amole(model, config or amole.AMoLEConfig(targets=targets))

    return surgery


def with_amole(problem: Problem, config: amole.AMoLEConfig | None = None) -> Problem:
    """The problem with its model's adapters replaced by AMoLE modules (`amole_surgery`); its
    `frozen` template holds their `ExpertMask`s."""
    return install(problem, amole_surgery(config))


def expert_assignment(sim: SimState) -> dict[str, np.ndarray]:
    """The expert assignment in a FedAMoLE state: `{AMoLE module: bool [E, C]}`, `X[e, c]` =
    client `c` holds expert `e` (the per-client `ExpertMask`s in `sim.clients.frozen`)."""
    held = amole.by_module(jax.device_get(sim.clients.frozen))
    return {module: np.asarray(x, bool).T for module, x in held.items()}


def expert_record(sim: SimState, tokenizer=None) -> dict:
    """`{"experts": ...}`: `expert_assignment` as 0/1 lists, the final record's analysis of a
    method with expert masks (`Method.analyses`; `tokenizer` unused)."""
    return {"experts": {m: x.astype(int).tolist() for m, x in expert_assignment(sim).items()}}


def fedamole(
    problem: Problem, options: FedAMoLEOptions = FedAMoLEOptions(), *, dispatch: Dispatch = "rsea"
) -> Algorithm:
    """FedAMoLE on `problem`; the mixture `options.amole` replaces the problem's adapters, and a
    model without AMoLE modules gets the default one (`with_amole`). `dispatch`: the next round's
    expert assignment, `rsea` (FedAMoLE), `static` (FedAMoLE-R: the random round-0 architecture
    for all rounds) or `random` (a fresh random architecture every round).

    `SimState.agg_state` is a `FedAMoLEServer` (the PRNG key of the random architectures, the
    state of the global part's rule: `options.server_opt`, a `GlobalRule`). Metrics per round:
    `train`, every evaluation set (local models after local training) and `aggregation`
    (`applied`, `experts_held`: per client, the mean number of held experts over modules; in
    `metrics.jsonl` as `<name>/experts_held`). The last round's record holds the final
    `expert_assignment` as `experts`.
    """
    if dispatch not in ("rsea", "static", "random"):
        raise ValueError(f"dispatch must be 'rsea', 'static' or 'random', got {dispatch!r}")
    if options.amole is not None:
        problem = with_amole(problem, options.amole)
    elif not any(isinstance(m, amole.AMoLE) for _, m in nnx.iter_graph(model_of(problem))):
        problem = with_amole(problem)
    n = problem.num_clients
    template_masks = amole.expert_masks(problem.frozen)
    pools = {path: mask.shape[0] for path, mask in amole.by_module(template_masks).items()}
    k, lo, hi = options.clients_per_expert, options.min_experts, options.max_experts
    for size in sorted(set(pools.values())):
        rsea.check_feasible(size, n, k, lo, hi)
    model = model_of(problem)
    top_k = max(m.top_k for _, m in nnx.iter_graph(model) if isinstance(m, amole.AMoLE))
    if lo < top_k:
        raise ValueError(f"min_experts={lo} is below the router's top_k={top_k}")
    if dispatch == "rsea" and problem.windows(options.aux_set) is None:
        raise ValueError(
            f"RSEA needs the clients' auxiliary data as the window set {options.aux_set!r}; "
            "hold it out of the training data with data.aux_fraction > 0 (the reference: 0.05)"
        )

    tx = scaled_tx(problem)
    update = make_client_update(
        problem.graphdef,
        tx,
        problem.training,
        max_windows=problem.train.max_windows(problem.training.seq_len),
    )
    client_stats = amole.make_client_stats(problem.graphdef, problem.eval_batch_size)

    def masks_from(assignments: dict[str, np.ndarray]) -> nnx.State:
        flat = [
            (p, v.replace(jnp.asarray(assignments[amole.module_path(p[:-1])], bool)))
            for p, v in nnx.to_flat_state(template_masks)
        ]
        return problem.strategy.place(nnx.from_flat_state(flat))

    def random_masks(key: jax.Array) -> nnx.State:
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
        return masks_from(
            {p: rsea.random_assignment(rng, e, n, k, lo, hi).T for p, e in pools.items()}
        )

    def rsea_masks(stats: amole.Stats, masks: nnx.State) -> nnx.State:
        held = amole.by_module(masks)
        assignments = {}
        for path, (token_means, expert_means) in stats.items():
            scores = rsea.scores(token_means, expert_means, held[path])
            assignments[path] = rsea.assign(np.asarray(scores), k, lo, hi).T
        return masks_from(assignments)

    def init(key: jax.Array) -> ClientState:
        k_clients, k_server = jax.random.split(key)
        masks = random_masks(jax.random.fold_in(k_server, 0))
        return init_clients(problem.template, tx, n, k_clients, shared_init=True, frozen=masks)

    def server_of(rule: Aggregator | None) -> ServerProgram:
        """The server with `rule` on the global part (`amole.held_by_all`: the shared expert and
        `W_tok`) in place of their mean over all clients; None: the mean. The domain experts are
        the holder average either way."""

        def init(key: jax.Array, clients: ClientState) -> FedAMoLEServer:
            state = () if rule is None else rule.init(clients.params)
            return FedAMoLEServer(jax.random.split(key)[1], state)

        def apply(clients: ClientState, server: FedAMoLEServer, inputs: RoundInputs):
            masks = clients.frozen
            stats = None
            if dispatch == "rsea":
                aux = inputs.windows(options.aux_set)
                weights = input_weights(aux.weights)
                per_client = ((clients.params, masks), aux.windows[..., :-1], weights)
                stats = map_clients(
                    with_frozen(client_stats), problem.strategy, per_client, (inputs.base,)
                )
                if options.noise_eta is not None:
                    keys = jax.random.split(jax.random.fold_in(server.key, inputs.round + 1), n)
                    stats = jax.vmap(amole.add_noise, (0, 0, None))(keys, stats, options.noise_eta)
            params = holder_average(clients.params, amole.holders(clients.params, masks))
            state = server.rule
            if rule is not None:
                own = merge_global(params, clients.params, amole.held_by_all)
                params, state = rule.apply(own, state, {})
            held = jnp.stack([m.sum(-1) for m in jax.tree.leaves(masks)]).astype(jnp.float32)
            metrics = {"applied": jnp.asarray(True), "experts_held": held.mean(0)}
            return clients._replace(params=params), server._replace(rule=state), metrics, stats

        return ServerProgram(
            init,
            apply,
            host,
            comm=lambda clients: amole_comm(clients, dispatch),
            global_part=GlobalPart(amole.held_by_all, lambda rule: server_of(stepped(rule))),
        )

    def next_masks(sim: SimState, stats) -> SimState:
        """The next round's architecture, on the host: RSEA's assignment from the uploaded
        statistics, or a fresh random one."""
        if dispatch == "rsea":
            masks = rsea_masks(stats, sim.clients.frozen)
        else:
            masks = random_masks(jax.random.fold_in(sim.agg_state.key, int(sim.round)))
        return sim._replace(clients=sim.clients._replace(frozen=masks))

    host = None if dispatch == "static" else next_masks
    stepped = lambda rule: with_server_optimizer(rule, options.server_opt, amole.held_by_all)
    stepped_mean = stepped(masked_aggregator(amole.held_by_all))
    server = server_of(None if options.server_opt.kind == "none" else stepped_mean)
    client = ClientProgram(init, local_training(problem, update))
    default = {"rsea": "fedamole", "static": "fedamole-r", "random": "fedamole-random"}
    method = Method(
        default[dispatch],
        round_decayed(client, tx, options.round_decay),
        server,
        evaluate="local",
        capabilities=Capabilities(cohorts=False, sweeps=host is None),
        analyses=expert_record,
    )
    return build(problem, method)


def amole_comm(clients: ClientState, dispatch: str) -> Exchange:
    """Bytes per client (int64 `[N]`) of FedAMoLE with `dispatch` (module docstring)."""
    held = nnx.to_flat_state(amole.holders(clients.params, clients.frozen))
    holds = np.zeros(num_rows(clients.params), np.int64)
    extra_up = extra_down = 0
    for (path, var), (_, mask) in zip(nnx.to_flat_state(clients.params), held, strict=True):
        value, mask = var.get_value(), np.asarray(mask.get_value())
        per_slot = value[0, 0].size if mask.ndim == 2 else value[0].size
        holds += mask.reshape(mask.shape[0], -1).sum(1) * per_slot * value.dtype.itemsize
        if path[-1] == "experts_a":  # [N, E, d_in, r]: one module's pool
            e, r = value.shape[1], value.shape[-1]
            extra_up += 4 * (r + e * r) if dispatch == "rsea" else 0
            extra_down += e if dispatch != "static" else 0
    return Exchange(holds + extra_up, holds + extra_down)


def fedamole_r(problem: Problem, options: FedAMoLEOptions = FedAMoLEOptions()) -> Algorithm:
    """FedAMoLE-R: the random round-0 architecture for all rounds, no RSEA."""
    return fedamole(problem, options, dispatch="static")


register(
    "fedamole",
    fedamole,
    FedAMoLEOptions(),
    doc="FedAMoLE: heterogeneous LoRA-expert mixtures assigned by RSEA",
    side=SideData(aux=0.05),  # the reference's 5 % auxiliary split for RSEA
)
register("fedamole-r", fedamole_r, FedAMoLEOptions())
