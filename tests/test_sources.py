"""The data-source registry (`fedjax_lora.experiment.sources`): every registered source that can
be built offline builds and validates from a config; a user's module registers a source of its
own and runs an experiment on it through `imports:` / `--import`; an unknown `data.source` is one
line naming the registered ones, answered before JAX is imported."""

from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fedjax_lora import config as config_lib
from fedjax_lora.config import DataSpec
from fedjax_lora.data import FederatedData
from fedjax_lora.data import comigs_datasets as cd
from fedjax_lora.data.instruction import ByteTokenizer
from fedjax_lora.errors import ConfigError
from fedjax_lora.experiment import SOURCES, build_data, register_source
from fedjax_lora.experiment.sources import checked_source
from tests.test_cli_imports import CLI_WITHOUT_JAX, TINY, _python
from tests.test_data_fortunes import _animal_fortunes
from tests.test_trust_weighted_data import _jsonl

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
SEQ = 16
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "rain", "tree", "bird", "fish"]

# Sources the battery cannot build from small local files: their paper splits fix hub-sized
# pools (`trust_datasets`: reference_tokens 300k / 500k, code_offset 20M tokens) that `from_spec`
# does not expose; `tests/test_trust_weighted_data.py` builds them with small budgets directly.
HUB_SIZED = {"multilingual_wikipedia", "code_wiki"}


def _articles(path: Path, word: str, n: int = 40) -> str:
    return _jsonl(path, [{"id": str(k), "text": f"{word} article {k} " * 8} for k in range(n)])


def _ag_news(root: Path) -> str:
    labels = ("World", "Sports", "Business", "SciTech")
    root.mkdir()
    for split, n in (("train", 60), ("test", 30)):
        rows = [
            {"text": f"{labels[k % 4]} news item {k}. " * 3, "label": k % 4} for k in range(4 * n)
        ]
        _jsonl(root / f"{split}.jsonl", rows)
    return str(root)


def _dolly(path: Path) -> str:
    rng = np.random.default_rng(0)
    categories = ["open_qa", "summarization", "creative_writing"]
    rows = []
    for i in range(90):
        w = rng.choice(WORDS, 3)
        rows.append(
            {
                "instruction": f"Name a {w[0]} thing.",
                "context": "" if i % 2 else f"The {w[1]} {w[2]}.",
                "response": f"A {w[0]} {w[1]}.",
                "category": categories[i % 3],
            }
        )
    return _jsonl(path, rows)


def _snli(path: Path) -> str:
    rng = np.random.default_rng(1)
    rows = []
    for i in range(90):
        w = rng.choice(WORDS, 2)
        rows.append({"premise": f"A {w[0]} runs.", "hypothesis": f"A {w[1]} runs.", "label": i % 3})
    return _jsonl(path, rows)


def _natural_instructions(path: Path) -> str:
    rows = [
        {
            "task_name": f"task00{t}_{name}",
            "definition": f"Answer with a {name} word.",
            "inputs": f"Which {WORDS[k % 10]}?",
            "targets": f"The {name} {WORDS[(k + t) % 10]}.",
        }
        for t, name in enumerate(("colour", "animal"), start=1)
        for k in range(30)
    ]
    return _jsonl(path, rows)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, tuple[list[str], object, int]]:
    """Per source: config overrides on small local files, the tokenizer the base hands over
    (None: the tiny random base, which reads bytes) and the number of clients, counted by
    hand."""
    tmp = tmp_path_factory.mktemp("sources")
    wiki = [_articles(tmp / f"wiki_{lang}.jsonl", f"{lang}wiki") for lang in cd.LANGUAGES]
    slimpajama = _jsonl(
        tmp / "slimpajama.jsonl",
        [
            {"text": f"{c} doc {k} " * 8, "meta": {"redpajama_set_name": c}}
            for k in range(40)
            for c in cd.SLIMPAJAMA_CATEGORIES
        ],
    )
    ag_news = _ag_news(tmp / "ag_news")
    paper = ["data.tokens_per_client=200", "data.val_fraction=0.2", "data.test_fraction=0.2"]
    comigs = [*paper, "data.clients_per_group=1"]
    # build_problem sets aux_fraction from the methods (None: their largest share); here none.
    instruction = ["data.num_clients=3", "data.instruction_packing=windows", "data.aux_fraction=0"]
    tok = ByteTokenizer()
    return {
        "synthetic": (["data.tokens_per_client=600"], None, 4),
        "fortunes": (
            [
                f"data.fortunes_dir={_animal_fortunes(tmp, 80, lambda k: 'ab' * (k % 7))}",
                "data.categories=[de,es]",
                "data.reference_sequences=2",
            ],
            None,
            4,
        ),
        "ag_news": (
            [f"data.paths=[{ag_news}]", "data.clients_per_group=1", "data.reference_sequences=4"],
            tok,
            4,
        ),
        "comigs_wikipedia": ([f"data.paths=[{','.join(wiki)}]", *comigs], tok, 4),
        "comigs_slimpajama": ([f"data.paths=[{slimpajama}]", *comigs], tok, 4),
        "comigs_ag_news": ([f"data.paths=[{ag_news}]", *comigs], tok, 4),
        "dolly": ([f"data.paths=[{_dolly(tmp / 'dolly.jsonl')}]", *instruction], None, 3),
        "snli": ([f"data.paths=[{_snli(tmp / 'snli.jsonl')}]", *instruction], None, 3),
        "natural_instructions": (
            [
                f"data.paths=[{_natural_instructions(tmp / 'ni.jsonl')}]",
                "data.num_tasks=2",
                "data.num_clients=2",
                "data.aux_fraction=0",
                "data.instruction_packing=windows",
            ],
            None,
            2,
        ),
    }


def test_the_battery_covers_every_registered_source(cases):
    assert set(cases) | HUB_SIZED == set(SOURCES)


@pytest.mark.parametrize("name", sorted(set(SOURCES) - HUB_SIZED))
def test_every_source_builds_and_validates_from_a_config(name, cases):
    """`build_data`: the registered builder of `data.source`, then the shared steps; every
    client holds tokens in every split, each below the vocabulary, the fields the source
    declares are `DataSpec` fields, and `data.train_fractions` keeps the first
    `round(f · |train_i|)` training tokens of client i."""
    overrides, tokenizer, clients = cases[name]
    assert set(SOURCES[name].fields) <= {f.name for f in dataclasses.fields(DataSpec)}
    config = config_lib.load(None, [f"data.source={name}", f"training.seq_len={SEQ}", *overrides])
    assert checked_source(config) is SOURCES[name]
    data = build_data(config, 256, tokenizer)
    assert isinstance(data, FederatedData) and data.num_clients == clients
    for what in ("reference", "mixtures"):  # the side data it declares, and no other
        assert (getattr(data, what) is not None) == (what in SOURCES[name].provides), what
    for split in ("train", "val", "test"):
        tokens = data.split(split)
        for i in range(clients):
            stream = np.asarray(tokens.stream(i))
            assert stream.size > 0 and stream.min() >= 0 and stream.max() < 256, (split, i)
    fractions = [0.5 + 0.25 * (i % 2) for i in range(clients)]
    config = config_lib.load(
        None,
        [f"data.source={name}", f"training.seq_len={SEQ}", *overrides]
        + [f"data.train_fractions=[{','.join(map(str, fractions))}]"],
    )
    kept = build_data(config, 256, tokenizer)
    for i, f in enumerate(fractions):
        full = np.asarray(data.train.stream(i))
        np.testing.assert_array_equal(kept.train.stream(i), full[: int(round(f * len(full)))])


def test_requirements_are_checked_before_building():
    """One line each: fortunes without categories, `eval_mixture=uniform` where no source builds
    it, `eval.generation` without a task, all raised before any file is read."""
    load = lambda *o: config_lib.load(None, list(o))
    with pytest.raises(ConfigError, match="data.categories is empty"):
        build_data(load("data.source=fortunes", "data.fortunes_dir=/nonexistent"), 256)
    with pytest.raises(ConfigError, match="built for data.source synthetic or fortunes, not"):
        build_data(load("data.source=ag_news", "data.eval_mixture=uniform"), 256)
    with pytest.raises(ConfigError, match=r"needs an instruction data source \('dolly', 'snli'"):
        build_data(load("eval.generation.metric=rouge_l"), 256)


def test_unknown_source_is_one_line_naming_the_registered_ones(tmp_path):
    with pytest.raises(ConfigError) as e:
        config_lib.load(None, ["data.source=wikitext"])
    message = str(e.value)
    assert "'wikitext'" in message and "\n" not in message
    assert all(repr(name) in message for name in SOURCES)
    result = _python(CLI_WITHOUT_JAX, tmp_path, "demo", "--set", "data.source=wikitext")
    assert "jax imported: False exit: 2" in result.stdout, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "'synthetic'" in result.stderr


def test_register_source_refuses_a_duplicate_and_unknown_fields():
    builder = SOURCES["synthetic"].builder
    with pytest.raises(ValueError, match="already registered"):
        register_source("synthetic", builder)
    with pytest.raises(ValueError, match=r"\['tokens'\] are not DataSpec fields"):
        register_source("never-registered", builder, fields=("tokens",))
    assert "never-registered" not in SOURCES


USER_SOURCE = """
'''A user's data source: client i's tokens repeat the pattern i, i + 1, ..., i + 7.'''
import numpy as np

from fedjax_lora.experiment.sources import register_source


def cycles(config, vocab_size, tokenizer):
    '''Each client a cycle of eight token ids of its own.'''
    from fedjax_lora.data import build_federated

    del tokenizer  # token ids of its own
    n, length = config.data.num_clients, config.data.tokens_per_client
    streams = [(i + np.arange(length) % 8) % vocab_size for i in range(n)]
    return build_federated(streams, vocab_size=vocab_size, split=(0.6, 0.2, 0.2))


register_source("cycles", cycles, fields=("num_clients", "tokens_per_client"), text=False)
"""


def test_a_source_registered_in_a_user_module_runs_through_imports(tmp_path):
    """`sources --import` lists it without loading JAX; a config naming it in `imports:` runs a
    one-round experiment on its clients."""
    (tmp_path / "my_sources.py").write_text(textwrap.dedent(USER_SOURCE))
    listed = _python(CLI_WITHOUT_JAX, tmp_path, "sources", "--import", "my_sources")
    assert "jax imported: False exit: 0" in listed.stdout, listed.stderr
    assert any(line.split()[0] == "cycles" for line in listed.stdout.splitlines() if line)
    # Unknown names list the user's source once its module is imported.
    bad = _python(
        CLI_WITHOUT_JAX, tmp_path, "demo", "--import", "my_sources", "--set", "data.source=cycle"
    )
    assert "exit: 2" in bad.stdout and "'cycles'" in bad.stderr
    config = tmp_path / "cycles.yaml"
    config.write_text(
        "imports: [my_sources]\nmethods: [local]\nrounds: 1\n"
        "data: {source: cycles, num_clients: 3, tokens_per_client: 600}\n"
        "tracking: {tensorboard: false}\n"
    )
    out = tmp_path / "run"
    run = "import sys; from fedjax_lora.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = ["run", str(config), "--out", str(out), "--no-progress", "--set"]
    argv += [item for item in TINY if not item.startswith("data.")]
    result = _python(run, tmp_path, *argv)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["local"]["client_names"] == ["client0", "client1", "client2"]
    assert json.loads((out / "config.json").read_text())["data"]["source"] == "cycles"
