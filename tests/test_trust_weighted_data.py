"""The trust-weighted paper's dataset builders on small local files shaped like the real ones
(AG News, Wikipedia, github-code), and the grid command on a tiny override."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from fedjax_lora.data import trust_datasets as td
from fedjax_lora.data.domains import article_pools
from tests.test_cli import TINY

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 1000
SEQ = 8


class ByteTokenizer:
    """UTF-8 bytes, +1 per language marker so domains stay distinguishable; no special tokens."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [list(t.encode()) for t in texts]}


def _jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _wiki(tmp_path, lang, n=60):
    rows = [
        {"id": str(k), "title": f"{lang}{k}", "text": f"{lang} article {k} " * 12} for k in range(n)
    ]
    return _jsonl(tmp_path / f"wikipedia_{lang}.jsonl", rows)


def _domain_of(stream: np.ndarray, marks: dict[str, bytes]) -> set[str]:
    text = bytes(stream.astype(np.uint8).tolist())
    return {d for d, m in marks.items() if m in text}


@pytest.fixture(scope="module")
def wiki_sources(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wiki")
    return [_wiki(tmp, lang) for lang in td.LANGUAGES]


@pytest.mark.parametrize("bug", [False, True])
def test_multilingual_mixed_mixtures_and_bug_compatible_monolingual(wiki_sources, bug):
    data = td.multilingual_wikipedia(
        "mixed",
        tokenizer=ByteTokenizer(),
        vocab_size=VOCAB,
        sources=wiki_sources,
        clients_per_language=2,
        train_tokens=400,
        val_tokens=80,
        reference_tokens=60,
        reference_sequences=6,
        seq_len=SEQ,
        paper_bug_compatible=bug,
        sample_fraction=1.0,
    )
    assert data.num_clients == 6
    marks = {lang: f"{lang} article".encode() for lang in td.LANGUAGES}
    for i in range(6):
        a, b = td.LANGUAGES[i % 3], td.LANGUAGES[(i + 1) % 3]
        expected = np.zeros(3)
        expected[i % 3] = 1.0 if bug else 0.75
        if not bug:
            expected[(i + 1) % 3] = 0.25
        np.testing.assert_allclose(data.mixtures[i], expected)
        assert int(data.train.lengths[i]) == 400 and int(data.val.lengths[i]) == 80
        assert _domain_of(data.train.stream(i), marks) == ({a} if bug else {a, b})
    assert data.reference.shape == (6, SEQ)
    # Reference windows: fr, de, it in that order, two each.
    ref_langs = [_domain_of(np.r_[w, w], marks) for w in data.reference]
    assert all(len(s) <= 1 for s in ref_langs)


def test_no_two_clients_share_tokens_and_specific_is_one_language(wiki_sources):
    data = td.multilingual_wikipedia(
        "specific",
        tokenizer=ByteTokenizer(),
        vocab_size=VOCAB,
        sources=wiki_sources,
        clients_per_language=2,
        train_tokens=300,
        val_tokens=60,
        reference_tokens=40,
        reference_sequences=3,
        seq_len=SEQ,
        sample_fraction=1.0,
    )
    np.testing.assert_allclose(data.mixtures, np.eye(3)[np.arange(6) % 3])
    # Independent check of disjointness: rebuild each language's pools with the same protocol.
    rng = np.random.default_rng(0)
    for lang, src in zip(td.LANGUAGES, wiki_sources, strict=True):
        articles = [json.loads(line)["text"] for line in Path(src).read_text().splitlines()]
        train, val = article_pools(articles, rng, 1.0, 0.16)
        pool = np.frombuffer(" ".join(train).encode(), np.uint8).astype(np.int32)
        k = td.LANGUAGES.index(lang)
        np.testing.assert_array_equal(data.train.stream(k), pool[:300])
        np.testing.assert_array_equal(data.train.stream(k + 3), pool[300:600])
    assert len(data.client_names) == 6 and data.test.lengths.tolist() == data.val.lengths.tolist()


@pytest.mark.parametrize("variant,bug", [("mixed", False), ("mixed", True), ("specific", False)])
def test_code_wiki_splits(tmp_path, variant, bug):
    wiki = _wiki(tmp_path, "en")
    code = _jsonl(
        tmp_path / "github_code.jsonl",
        [
            {
                "code": f"class C{k} {{ int javacode; }}",
                "repo_name": "r",
                "path": f"C{k}.java",
                "language": "Java" if k % 5 else "Python",
                "license": "mit",
                "size": 30,
            }
            for k in range(300)
        ],
    )
    data = td.code_wiki(
        variant,
        tokenizer=ByteTokenizer(),
        vocab_size=VOCAB,
        wiki_source=wiki,
        code_source=code,
        num_clients=4,
        train_tokens=200,
        val_tokens=40,
        reference_tokens=40,
        reference_sequences=4,
        seq_len=SEQ,
        code_offset=100,
        code_files=1000,
        paper_bug_compatible=bug,
        sample_fraction=1.0,
    )
    wiki_share = data.mixtures[:, 0]
    if variant == "specific":
        np.testing.assert_allclose(wiki_share, [1, 0, 1, 0])
    elif bug:
        np.testing.assert_allclose(wiki_share, [0.75] * 4)
    else:
        np.testing.assert_allclose(wiki_share, [0.75, 0.25, 0.75, 0.25])
    marks = {"en": b"en article", "java": b"javacode"}
    for i in range(4):
        assert _domain_of(data.train.stream(i), marks) == {
            d for d, share in zip(("en", "java"), data.mixtures[i], strict=True) if share > 0
        }
        assert b"def f" not in bytes(data.train.stream(i).astype(np.uint8).tolist())


@pytest.mark.parametrize("variant", ["mixed", "specific"])
def test_ag_news_classes_and_reference(tmp_path, variant):
    labels = ("World", "Sports", "Business", "SciTech")
    for split, n in (("train", 40), ("test", 16)):
        _jsonl(
            tmp_path / f"{split}.jsonl",
            [{"text": f"{labels[k % 4]} news item {k}.", "label": k % 4} for k in range(4 * n)],
        )
    data = td.ag_news(
        variant,
        tokenizer=ByteTokenizer(),
        vocab_size=VOCAB,
        source=str(tmp_path),
        reference_sequences=8,
        seq_len=SEQ,
    )
    if variant == "specific":
        np.testing.assert_allclose(data.mixtures, np.eye(4)[np.arange(8) // 2])
    else:
        np.testing.assert_allclose(data.mixtures[0], [0.25, 0.75, 0, 0], atol=0.01)
        np.testing.assert_allclose(data.mixtures[3], [0, 0, 0.75, 0.25], atol=0.01)
    marks = {name: name.encode() for name in labels}
    covered = set().union(*(_domain_of(w, marks) for w in data.reference))
    assert covered == set(labels)
    bug = td.ag_news(
        variant,
        tokenizer=ByteTokenizer(),
        vocab_size=VOCAB,
        source=str(tmp_path),
        reference_sequences=8,
        seq_len=SEQ,
        paper_bug_compatible=True,
    )
    if variant == "specific":  # clients 0-3 only: World and Sports
        assert set().union(*(_domain_of(w, marks) for w in bug.reference)) <= {"World", "Sports"}


def test_grid_command_runs_a_tiny_override(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "tw_run", ROOT / "experiments" / "trust_weighted" / "run.py"
    )
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    out = tmp_path / "grid"
    argv = [
        "--out",
        str(out),
        "--cells",
        "multilingual-specific",
        "--seeds",
        "1",
        "2",
        "--methods",
        "local",
        "pcl-val",
        "--no-progress",
        "--set",
        *TINY,
        "model.source=null",
        "data.source=synthetic",
        "data.num_groups=2",
        "data.clients_per_group=2",
        "data.reference_sequences=4",
        "rounds=2",
        "training.steps=1",
        "training.batch_size=2",
        "training.grad_accum=1",
        "eval.max_windows=4",
        "eval.batch_size=4",
        "trust.first_aggregation_round=2",
        "trust.top_k=8",
        "optimizer.total_steps=2",
    ]
    assert run.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["metric"] == "val_mean_ppl"
    cell = results["results"]["multilingual-specific"]
    assert set(cell) == {"local", "pcl-val"} and all(len(v) == 2 for v in cell.values())
    summaries = [
        json.loads((out / "multilingual-specific" / f"seed{s}" / "summary.json").read_text())
        for s in (1, 2)
    ]
    assert cell["pcl-val"] == [s["pcl-val"]["val_mean_ppl"] for s in summaries]
    table = (out / "results.md").read_text()
    assert "| multilingual-specific |" in table and "±" in table
    assert (out / "heatmaps" / "multilingual-specific.png").stat().st_size > 0


def test_pretrained_synthetic_base_round_trips_and_serves_synthetic_runs(tmp_path):
    """The offline-evidence base: trained on the common chain only, saved as an HF checkpoint that
    `models.load` reads back to the same logits, usable as `model.source` without a tokenizer."""
    import jax.numpy as jnp

    from fedjax_lora import models
    from fedjax_lora.config import load as load_config
    from fedjax_lora.data.synthetic import make_markov_sources
    from fedjax_lora.experiment import build_model
    from fedjax_lora.export import save_merged

    spec = importlib.util.spec_from_file_location(
        "tw_pretrain", ROOT / "experiments" / "trust_weighted" / "pretrain_synthetic_base.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = ["--out", str(tmp_path / "base"), "--steps", "2", "--documents", "16"]
    args += ["--batch-size", "4", "--seq-len", "16", "--vocab-size", "64", "--d-model", "32"]
    args += ["--d-ff", "64", "--max-positions", "32", "--num-groups", "3"]
    ns = script.parse_args(args)

    docs = script.pretraining_windows(ns)
    chains = make_markov_sources(3, 64, seed=0)
    common = {(a, b) for a in range(64) for b in chains.successors[3, a]}
    pairs = {(int(a), int(b)) for row in docs for a, b in zip(row[:-1], row[1:], strict=True)}
    assert pairs <= common  # every transition is one of the common chain's

    model = script.pretrain(ns)
    save_merged(model, ns.out)
    loaded = models.load(ns.out)
    tokens = jnp.asarray(docs[:2, :-1])
    np.testing.assert_allclose(loaded(tokens), model(tokens), atol=1e-5)

    config = load_config(
        None, [f"model.source={ns.out}", "data.source=synthetic", "lora.targets=[c_attn]"]
    )
    base, tokenizer = build_model(config)
    assert tokenizer is None and base.config.vocab_size == 64


def test_pretraining_windows_from_fortunes_are_that_languages_bytes(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "tw_pretrain2", ROOT / "experiments" / "trust_weighted" / "pretrain_synthetic_base.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    (tmp_path / "de").mkdir()
    items = [f"Die Katze Nummer {k} schläft." for k in range(30)]
    (tmp_path / "de" / "tiere").write_text("\n%\n".join(items) + "\n%\n")
    args = ["--out", "unused", "--fortunes-language", "de", "--fortunes-dir", str(tmp_path)]
    ns = script.parse_args([*args, "--vocab-size", "256", "--seq-len", "12", "--documents", "9"])
    windows = script.pretraining_windows(ns)
    assert windows.shape == (9, 13)
    text = "\n".join(items).encode("utf-8")
    assert all(bytes(w.astype(np.uint8).tolist()) in text for w in windows)
