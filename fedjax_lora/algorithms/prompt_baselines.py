r"""Federated soft-prompt baselines of FedAMoLE (Zhang et al., arXiv:2411.19128, §4 baselines;
reference `zyc140345/FedAMoLE`, `train_baselines.py`, `baselines/`): FedPrompt and FedPTuning,
each with its "-FT" variant.

- `fedprompt`: every client trains a soft prompt `E ∈ R^{P×d}` (prompt tuning,
  `fedjax_lora.prompt_tuning`) on the frozen base; after every round the server averages the
  prompts, `E ← (1/N) Σ_c E_c`, and every client receives the mean (FedAvg; all clients start from
  the same prompt).
- `fedptuning`: the same with P-tuning, `prompt = f(E)`: the table `E` *and* the prompt encoder
  `f` are averaged.
- `-ft`: the same training; the reported model is each client's prompt after its local training,
  before aggregation (the global prompt fine-tuned on the client's data; FedAMoLE's FedIT-FT
  protocol, `Method.evaluate="local"`). The plain variants report the aggregated prompt.

The problem's LoRA adapters are replaced by the prompt (`with_prompt`). Defaults: `P = 20`;
prompt tuning starts from the embeddings of `P` random vocabulary tokens (PEFT `SAMPLE_VOCAB`;
the reference initialises from a dataset-specific text, `PromptTuningConfig(init="text")` with
its token ids); P-tuning uses the reference's MLP encoder of hidden size 1024. Local training and
the optimizer are the problem's, as for `fedavg` (the reference re-creates Adam every round with
a learning rate decayed by 0.99 per round; that schedule is not applied here).

The federated toolbox (`docs/aggregation.md`): the prompt is the global part, so every option of
FedAvg applies: `server_opt`, `proximal_mu`, and the config's `aggregation.reduction` /
`aggregation.dp` (not with `reference_state_dict`, whose server writes the encoders' outputs into
the table: not a mean of the tensors).

| `server_opt` | `proximal_mu` | `scaffold` | `reduction` | `dp` |
|---|---|---|---|---|
| ✓ | ✓ | – | ✓ (✗ `reference_state_dict`) | ✓ (✗ `reference_state_dict`) |

`FedPTuningOptions(reference_state_dict=True)` reproduces what the reference averages for P-tuning:
PEFT's state dict of a P-tuning model in training mode is the encoder's *output* `f(E)`
(`get_prompt_embedding_to_save`), and loading it writes it into the *input* table `E`, so after a
round every client's table is `(1/N) Σ_c f_c(E_c)` and passes through the encoder once more. (The
reference's encoder is one object that the clients train in turn, which a parallel round cannot
reproduce; here the encoders are averaged.)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_lora.aggregation import Aggregator, fedavg_aggregator
from fedjax_lora.algorithms.base import Algorithm, Evaluate, federated
from fedjax_lora.algorithms.problem import Problem, Surgery, install, model_of
from fedjax_lora.algorithms.registry import register
from fedjax_lora.lora import detach_adapters
from fedjax_lora.prompt_tuning import PromptConfig, PromptTuningConfig, PTuningConfig, attach_prompt
from fedjax_lora.settings import ServerOptimizer

__all__ = [
    "DEFAULT_PROMPT",
    "DEFAULT_PTUNING",
    "FedPTuningOptions",
    "FedPromptOptions",
    "fedprompt",
    "fedprompt_ft",
    "fedptuning",
    "fedptuning_ft",
    "prompt_surgery",
    "reference_state_dict_aggregator",
    "with_prompt",
]

DEFAULT_PROMPT = PromptTuningConfig(num_virtual_tokens=20, init="vocab")
"""The registered FedPrompt's prompt: 20 virtual tokens from random vocabulary embeddings."""

DEFAULT_PTUNING = PTuningConfig(num_virtual_tokens=20, encoder="mlp", hidden_size=1024)
"""The registered FedPTuning's prompt: the reference's 20 tokens, MLP encoder of width 1024."""


def prompt_surgery(config: PromptConfig, *, key: jax.Array | None = None) -> Surgery:
    """The surgery replacing a model's adapters by the soft prompt of `config`
    (`prompt_tuning.attach_prompt`; `key` draws a `vocab` init's token ids)."""

    def surgery(model: nnx.Module) -> None:
        detach_adapters(model)
        attach_prompt(model, config, key=key)

    return surgery


def with_prompt(problem: Problem, config: PromptConfig, *, key: jax.Array | None = None) -> Problem:
    """The problem with its model's adapters replaced by the soft prompt of `config`
    (`prompt_surgery`), which with the training windows must fit the model's context."""
    seq_len, context = problem.training.seq_len, model_of(problem).config.max_positions
    if config.length + seq_len > context:
        raise ValueError(
            f"{config.length} virtual tokens + sequence length {seq_len} exceed the model's "
            f"context of {context} positions; lower num_virtual_tokens or training.seq_len"
        )
    return install(problem, prompt_surgery(config, key=key))


@dataclasses.dataclass(frozen=True)
class FedPromptOptions:
    """prompt: the soft prompt every client trains (default `DEFAULT_PROMPT`). server_opt: a server
    optimizer on the averaged prompt (`aggregation.server_opt`). proximal_mu > 0: FedProx's
    proximal term on the local loss (the prompt is all global)."""

    prompt: PromptTuningConfig = DEFAULT_PROMPT
    server_opt: ServerOptimizer = ServerOptimizer()
    proximal_mu: float = 0.0


@dataclasses.dataclass(frozen=True)
class FedPTuningOptions:
    """prompt: the P-tuning prompt (table and encoder; default `DEFAULT_PTUNING`).
    reference_state_dict: average the encoder outputs into the table as the reference does
    (module docstring). server_opt, proximal_mu: as `FedPromptOptions`."""

    prompt: PTuningConfig = DEFAULT_PTUNING
    reference_state_dict: bool = False
    server_opt: ServerOptimizer = ServerOptimizer()
    proximal_mu: float = 0.0


def _fedprompt(problem: Problem, options: FedPromptOptions, name: str, evaluate: Evaluate):
    if not isinstance(options.prompt, PromptTuningConfig):
        raise ValueError(f"{name} needs a PromptTuningConfig, got {type(options.prompt).__name__}")
    return federated(
        name,
        with_prompt(problem, options.prompt),
        fedavg_aggregator(),
        shared_init=True,
        evaluate=evaluate,
        server_model=True,
        policy="all",
        server_opt=options.server_opt,
        proximal_mu=options.proximal_mu or None,
    )


def fedprompt(problem: Problem, options: FedPromptOptions = FedPromptOptions()) -> Algorithm:
    """FedPrompt: FedAvg of soft prompts (prompt tuning), tested on the aggregated prompt."""
    return _fedprompt(problem, options, "fedprompt", "aggregated")


def fedprompt_ft(problem: Problem, options: FedPromptOptions = FedPromptOptions()) -> Algorithm:
    """FedPrompt-FT: FedAvg of soft prompts, each client tested after local fine-tuning."""
    return _fedprompt(problem, options, "fedprompt-ft", "local")


def reference_state_dict_aggregator(encoder_def: nnx.GraphDef) -> Aggregator:
    """FedAvg of a P-tuning prompt as the FedAMoLE reference does it (module docstring): the
    encoders `f_c` are averaged, and every client's table becomes `(1/N) Σ_c f_c(E_c)`.

    encoder_def: the graphdef of the model's `PromptEncoder` (`nnx.graphdef(model.prompt)`); the
    stacked tree is the model's adapter state, holding the encoder under `prompt`.
    """
    average = fedavg_aggregator()

    def apply(stacked_tree, state, inputs=None):
        outputs = jax.vmap(lambda s: nnx.merge(encoder_def, s)())(stacked_tree["prompt"])
        tree, state = average.apply(stacked_tree, state, inputs)
        table = tree["prompt"]["embedding"]
        mean = jnp.broadcast_to(outputs.mean(0), outputs.shape).astype(table.dtype)
        tree["prompt"]["embedding"] = table.replace(mean)
        return tree, state

    return Aggregator(average.init, apply)


def _fedptuning(problem: Problem, options: FedPTuningOptions, name: str, evaluate: Evaluate):
    if not isinstance(options.prompt, PTuningConfig):
        raise ValueError(f"{name} needs a PTuningConfig, got {type(options.prompt).__name__}")
    problem = with_prompt(problem, options.prompt)
    aggregator, policy = fedavg_aggregator(), "all"
    if options.reference_state_dict:  # not a mean of the tensors: no replaceable global part
        policy = None
        aggregator = reference_state_dict_aggregator(nnx.graphdef(model_of(problem).prompt))
    return federated(
        name,
        problem,
        aggregator,
        shared_init=True,
        evaluate=evaluate,
        server_model=True,
        policy=policy,
        server_opt=options.server_opt,
        proximal_mu=options.proximal_mu or None,
    )


def fedptuning(problem: Problem, options: FedPTuningOptions = FedPTuningOptions()) -> Algorithm:
    """FedPTuning: FedAvg of P-tuning prompts (table and encoder), tested on the aggregated
    prompt."""
    return _fedptuning(problem, options, "fedptuning", "aggregated")


def fedptuning_ft(problem: Problem, options: FedPTuningOptions = FedPTuningOptions()) -> Algorithm:
    """FedPTuning-FT: FedAvg of P-tuning prompts, each client tested after local tuning."""
    return _fedptuning(problem, options, "fedptuning-ft", "local")


register("fedprompt", fedprompt, FedPromptOptions())
register("fedprompt-ft", fedprompt_ft, FedPromptOptions())
register("fedptuning", fedptuning, FedPTuningOptions())
register("fedptuning-ft", fedptuning_ft, FedPTuningOptions())
