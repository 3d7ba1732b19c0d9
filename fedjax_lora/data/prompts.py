"""Prompt templates of the FedAMoLE reference (`data/prompt.py`) for instruction and NLI data."""

from __future__ import annotations

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, "
    "paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
SNLI_TEMPLATE = 'Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\n'
SNLI_CHOICES = ("Yes", "Maybe", "No")  # labels 0 entailment, 1 neutral, 2 contradiction


def alpaca_prompt(instruction: str, context: str = "") -> str:
    """Alpaca prompt; the `### Input:` block only when `context` is non-empty."""
    if context != "":
        return ALPACA_WITH_INPUT.format(instruction=instruction, context=context)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def snli_prompt(premise: str, hypothesis: str) -> str:
    """SNLI scored as a language-modelling task; the target is `SNLI_CHOICES[label]`."""
    return SNLI_TEMPLATE.format(premise=premise, hypothesis=hypothesis)
