"""`Problem`: everything a federated simulation holds fixed — base model, adapter template,
client data on device, evaluation sets, the side data its methods declared (`SideData`),
local-training and optimizer settings, strategy — and `install`, the one seam through which a
method changes the problem's model (a *surgery*: LoRA ranks, mixtures of experts, AMoLE, soft
prompts)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fedjax_lora.data.federated import check_streams
from fedjax_lora.data.streams import ClientTokens
from fedjax_lora.engine.cohort import Cohort
from fedjax_lora.engine.evaluate import EvalSet, make_eval_set, shared_eval_set
from fedjax_lora.engine.instruction import ChoiceSet, GenerationSet, TextTask
from fedjax_lora.engine.optim import OptimizerConfig
from fedjax_lora.engine.strategy import Strategy
from fedjax_lora.engine.train import LocalTraining
from fedjax_lora.errors import DataError
from fedjax_lora.models.layers import Adapter, ClientFrozen
from fedjax_lora.settings import GlobalRule

Surgery = Callable[[nnx.Module], None]
"""A change to a model with its adapters, in place (e.g. `fedjax_lora.amole.add_amole` with its
config bound): attaches, replaces or removes adapter modules."""


class TrainData(NamedTuple):
    """Training streams on device (a pytree): `tokens int32 [N, L]`, `lengths int32 [N]`, optional
    `mask uint8 [N, L]` (1 where a token counts as a target)."""

    tokens: jax.Array
    lengths: jax.Array
    mask: jax.Array | None

    @property
    def num_clients(self) -> int:
        return int(self.tokens.shape[0])

    def max_windows(self, seq_len: int) -> int:
        return max(int(self.tokens.shape[1]) // seq_len, 1)

    def token_counts(self) -> jax.Array:
        return self.lengths.astype(jnp.float32)

    @classmethod
    def from_client_tokens(cls, ct: ClientTokens) -> TrainData:
        mask = None if ct.loss_mask is None else jnp.asarray(ct.loss_mask, jnp.uint8)
        return cls(jnp.asarray(ct.tokens, jnp.int32), jnp.asarray(ct.lengths, jnp.int32), mask)

    def pooled(self) -> TrainData:
        """All clients' streams concatenated into one client (centralized training)."""
        lengths = np.asarray(self.lengths)
        tokens = np.asarray(self.tokens)
        pooled = np.concatenate([tokens[i, : lengths[i]] for i in range(len(lengths))])
        mask = None
        if self.mask is not None:
            m = np.asarray(self.mask)
            mask = jnp.asarray(np.concatenate([m[i, : lengths[i]] for i in range(len(lengths))]))
            mask = mask[None]
        return TrainData(jnp.asarray(pooled[None]), jnp.asarray([pooled.size], jnp.int32), mask)


class SideData(NamedTuple):
    """The data a method reads besides the clients' training and evaluation data, declared with
    its registration (`algorithms.uses`); the problem builder (`experiment.build_problem`)
    provides it, in `Problem.side`, only when a selected method declares it. Side data are never
    evaluated.

    aux: the share of every client's training tokens held out as its auxiliary windows
      (`side["aux"]`, an `EvalSet`, every token counted: FedAMoLE's RSEA statistics, FDLoRA's
      fusion), the method's default when `data.aux_fraction` is unset (the FedAMoLE reference:
      0.05); 0: none.
    reference: shared reference sequences `int32 [S, T]` (`side["reference"]`, prediction trust).
    mixtures: the clients' known data proportions `f32 [N, K]` (`side["mixtures"]`, oracle
      trust).
    """

    aux: float = 0.0
    reference: bool = False
    mixtures: bool = False


PER_CLIENT_SIDE = ("aux", "mixtures")
"""The side data with a leading client axis (gathered for a cohort like the evaluation sets)."""


@dataclasses.dataclass(frozen=True)
class Problem:
    """A simulation's fixed parts. `graphdef`/`template`/`frozen`/`base` come from `split_model`
    of a model with adapters attached (`frozen`: one client's `ClientFrozen` variables, e.g.
    expert masks, which a method sets per client in `ClientState.frozen`); `eval_sets` maps a
    name (`val`, `test`, shared sets) to an `EvalSet`; `cohort`: the clients drawn per round out
    of the population (None: every client, every round; see `fedjax_lora.engine.cohort`);
    `task`: how a text-task set among `eval_sets` is scored (`with_task`); `eval_progress`:
    every client's evaluation ticks the host's open `fedjax_lora.tracking.evaluation_progress`
    bar (a host callback compiled into the round); `global_rule`: how every method with a
    global part reduces it (robust reduction, DP; `algorithms.base.with_global_rule`)."""

    graphdef: nnx.GraphDef
    template: nnx.State
    base: nnx.State
    train: TrainData
    eval_sets: dict[str, EvalSet | GenerationSet | ChoiceSet]
    training: LocalTraining
    optimizer: OptimizerConfig | optax.GradientTransformation
    strategy: Strategy = Strategy()
    eval_batch_size: int = 8
    client_names: tuple[str, ...] = ()
    side: dict[str, Any] = dataclasses.field(default_factory=dict)
    cohort: Cohort | None = None
    task: TextTask | None = None
    eval_progress: bool = False
    global_rule: GlobalRule = GlobalRule()
    frozen: nnx.State = dataclasses.field(default_factory=lambda: nnx.State({}))

    @property
    def num_clients(self) -> int:
        return self.train.num_clients

    def with_task(
        self, task: TextTask, task_set: GenerationSet | ChoiceSet, name: str = "task"
    ) -> Problem:
        """The problem with a text task (ROUGE-L of greedy generations or multiple-choice
        accuracy, `fedjax_lora.engine.instruction`) evaluated as the set `name` by every method."""
        task.check(task_set)
        if task_set.valid.shape[0] != self.num_clients:
            raise ValueError(
                f"task set has {task_set.valid.shape[0]} clients, the problem {self.num_clients}"
            )
        if task_set.valid.shape[1] % self.eval_batch_size:
            raise ValueError(
                f"task set holds {task_set.valid.shape[1]} examples per client, not a multiple of "
                f"eval_batch_size={self.eval_batch_size}; build it with that batch size"
            )
        eval_sets = {**self.eval_sets, name: task_set}
        return dataclasses.replace(self, eval_sets=eval_sets, task=task)

    def windows(self, name: str) -> EvalSet | None:
        """The window set `name`: the auxiliary side data (`aux`) or an evaluation set; None
        when the problem has neither (or `name` is a text task)."""
        found = self.side.get(name) if name == "aux" else self.eval_sets.get(name)
        return found if isinstance(found, EvalSet) else None

    def tx(self) -> optax.GradientTransformation:
        """The clients' optimizer: any optax transformation, or one built from `OptimizerConfig`."""
        if isinstance(self.optimizer, OptimizerConfig):
            return self.optimizer.build()
        return self.optimizer

    @classmethod
    def create(
        cls,
        model: nnx.Module,
        train: ClientTokens,
        eval_windows: dict[str, tuple[np.ndarray, ...]],
        *,
        training: LocalTraining,
        optimizer: OptimizerConfig | optax.GradientTransformation,
        strategy: Strategy = Strategy(),
        eval_batch_size: int = 8,
        client_names: tuple[str, ...] = (),
        shared_windows: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
        side: dict[str, Any] | None = None,
        cohort: Cohort | None = None,
    ) -> Problem:
        """Builds a problem from a model that already holds its adapters.

        eval_windows: per-client sets `{name: (windows [N, W, T+1], valid [N, W])}`, or with a
        third member, the target weights `[N, W, T]` (only those tokens count, e.g. responses);
        shared_windows: sets every client is evaluated on `{name: (windows [W, T+1], valid [W])}`;
        side: side data (`SideData`): `aux` per-client windows as in `eval_windows` (every
        token counts unless weights are given), `reference` shared sequences `int32 [S, T]`
        (prediction trust), `mixtures` the clients' known data proportions `[N, K]` (oracle
        trust).
        """
        graphdef, template, frozen, base = split_model(model)
        if not jax.tree.leaves(template):
            raise ValueError("the model holds no adapters; attach some with lora.add_lora first")
        cfg = model.config
        if training.seq_len > cfg.max_positions:
            raise ValueError(
                f"sequence length {training.seq_len} is longer than the model's context of "
                f"{cfg.max_positions} positions; lower seq_len"
            )
        check_streams(train, training.seq_len, cfg.vocab_size, "train", client_names or None)
        side = dict(side or {})
        unknown = sorted(set(side) - set(SideData._fields))
        if unknown:
            raise ValueError(f"unknown side data {unknown}; expected some of {SideData._fields}")
        aux = {"aux": side["aux"]} if "aux" in side else {}
        for name, (w, *_) in {**eval_windows, **(shared_windows or {}), **aux}.items():
            check_eval_vocab(np.asarray(w), cfg.vocab_size, name)
        data = TrainData.from_client_tokens(train)
        strategy.check_clients(data.num_clients)
        if cohort is not None:
            cohort.check(data.num_clients)
            strategy.check_clients(cohort.size)
        sets = {
            k: make_eval_set(w[0], w[1], eval_batch_size, *w[2:]) for k, w in eval_windows.items()
        }
        for k, (w, v) in (shared_windows or {}).items():
            sets[k] = shared_eval_set(w, v, data.num_clients, eval_batch_size)
        if "aux" in side:
            w = side["aux"]
            side["aux"] = strategy.place(make_eval_set(w[0], w[1], eval_batch_size, *w[2:]))
        if "reference" in side:
            side["reference"] = strategy.replicate(jnp.asarray(side["reference"], jnp.int32))
        if "mixtures" in side:
            side["mixtures"] = np.asarray(side["mixtures"], np.float32)
        return cls(
            graphdef=graphdef,
            template=template,
            base=strategy.place_base(base),
            frozen=frozen,
            train=strategy.place(data),  # `sharded`: client rows on their devices
            eval_sets=strategy.place(sets),
            training=training,
            optimizer=optimizer,
            strategy=strategy,
            eval_batch_size=eval_batch_size,
            client_names=tuple(client_names),
            side=side,
            cohort=cohort,
        )


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State, nnx.State]:
    """`(graphdef, adapters, frozen, base)`: the trainable `Adapter` variables, the per-client
    `ClientFrozen` ones and the shared rest; `nnx.merge(graphdef, adapters, frozen, base)`
    rebuilds the model."""
    return nnx.split(model, Adapter, ClientFrozen, ...)


def model_of(problem: Problem) -> nnx.Module:
    """The problem's model: its base with the template's adapters and frozen state, in variables
    of its own (`copy`), so changing it (`install`'s surgery, also inside a traced factory)
    never touches the problem's templates."""
    return nnx.merge(problem.graphdef, problem.template, problem.frozen, problem.base, copy=True)


def install(problem: Problem, surgery: Surgery) -> Problem:
    """The problem with `surgery` applied to its model: the model is rebuilt from the problem
    (`model_of`), changed in place, split again (`split_model`: graphdef, adapter template,
    frozen template, base), and the base placed on devices as the problem's strategy wants it
    (`Strategy.place_base`: sharded over the `model` axis when `strategy.model_devices > 1`)."""
    model = model_of(problem)
    surgery(model)
    graphdef, template, frozen, base = split_model(model)
    base = problem.strategy.place_base(base)
    return dataclasses.replace(
        problem, graphdef=graphdef, template=template, frozen=frozen, base=base
    )


def check_eval_vocab(windows: np.ndarray, vocab_size: int, name: str) -> None:
    """Raises `DataError` when evaluation set `name`'s windows hold token ids outside
    `[0, vocab_size)` (they would evaluate to NaN or wrong perplexities silently)."""
    if windows.size and (windows.min() < 0 or windows.max() >= vocab_size):
        bad = int(windows.max() if windows.max() >= vocab_size else windows.min())
        raise DataError(
            f"evaluation set {name!r} holds token id {bad}, outside the model's vocabulary "
            f"[0, {vocab_size}); tokenize it with the base's tokenizer or use a larger model"
        )
