"""Data pipeline: token streams, tokenization, partitioners, synthetic and fortune corpora,
`FederatedData`. Hugging Face dataset loaders live in `fedjax_lora.data.datasets_hf` (imported on
demand, it pulls in `datasets`)."""

from fedjax_lora.data.federated import (
    FederatedData,
    build_federated,
    check_streams,
    keep_train_fraction,
    uniform_evaluation,
)
from fedjax_lora.data.partition import (
    category_proportions,
    check_proportions,
    dirichlet,
    mixed,
    specific,
)
from fedjax_lora.data.streams import (
    ClientTokens,
    MaskedStream,
    eval_window_starts,
    eval_windows,
    gather_windows,
    open_stream,
    reference_windows,
    stack_streams,
    write_stream,
)
from fedjax_lora.data.synthetic import MarkovSources, make_markov_sources, synthetic_corpus
from fedjax_lora.data.tokenize import (
    check_vocab,
    tokenize_example_rows,
    tokenize_prompt_target,
    tokenize_texts,
)

__all__ = [
    "ClientTokens",
    "FederatedData",
    "check_streams",
    "MarkovSources",
    "MaskedStream",
    "build_federated",
    "category_proportions",
    "check_proportions",
    "check_vocab",
    "dirichlet",
    "eval_window_starts",
    "eval_windows",
    "gather_windows",
    "keep_train_fraction",
    "make_markov_sources",
    "mixed",
    "open_stream",
    "reference_windows",
    "specific",
    "stack_streams",
    "synthetic_corpus",
    "tokenize_example_rows",
    "tokenize_prompt_target",
    "tokenize_texts",
    "uniform_evaluation",
    "write_stream",
]
