"""Hugging Face dataset loaders on small local files shaped like the real datasets
(tests/data/hf), fully offline with the cache in a temp dir."""

import json
from pathlib import Path

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")

from fedjax_lora.data import datasets_hf as hf  # noqa: E402
from fedjax_lora.data.partition import specific  # noqa: E402
from fedjax_lora.data.prompts import alpaca_prompt  # noqa: E402

DATA = Path(__file__).parent / "data" / "hf"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network, no writes outside tmp: offline flags (env and the already-read config)."""
    import huggingface_hub.constants

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_ag_news_splits_labels_and_specific_partition(cache):
    train = hf.load_ag_news(DATA / "ag_news", cache_dir=cache)
    rows = _jsonl(DATA / "ag_news" / "train.jsonl")
    assert train.texts == [r["text"] for r in rows]
    np.testing.assert_array_equal(train.labels, [r["label"] for r in rows])
    assert train.label_names == ("World", "Sports", "Business", "Sci/Tech")
    test = hf.load_ag_news(DATA / "ag_news", split="test", cache_dir=cache)
    np.testing.assert_array_equal(test.labels, [0, 1, 2, 3])
    parts = specific(train.labels, 8)  # AG-specific: client i holds one half of class i // 2
    for i, p in enumerate(parts):
        assert len(p) == 1 and train.labels[p[0]] == i // 2
    assert len(hf.load_ag_news(DATA / "ag_news", limit=3, cache_dir=cache).texts) == 3


def test_wikipedia_local_file(cache):
    texts = hf.load_wikipedia("de", DATA / "wikipedia_de.jsonl", cache_dir=cache)
    assert texts == [r["text"] for r in _jsonl(DATA / "wikipedia_de.jsonl")]
    assert hf.load_wikipedia("de", DATA / "wikipedia_de.jsonl", limit=1, cache_dir=cache) == [
        "Berlin ist die Hauptstadt Deutschlands."
    ]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_github_code_filters_language(fmt, tmp_path, cache):
    source = DATA / "github_code.jsonl"
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        source = tmp_path / "code" / "train-00000-of-00001.parquet"
        source.parent.mkdir()
        pq.write_table(pa.Table.from_pylist(_jsonl(DATA / "github_code.jsonl")), source)
        source = source.parent  # a directory of split-named parquet shards
    java = [r["code"] for r in _jsonl(DATA / "github_code.jsonl") if r["language"] == "Java"]
    assert hf.load_github_code(source, cache_dir=cache) == java
    assert hf.load_github_code(source, limit=2, streaming=False, cache_dir=cache) == java[:2]
    assert hf.load_github_code(source, language="C", cache_dir=cache) == [
        "int main() { return 0; }"
    ]


def test_slimpajama_categories(cache):
    rows = _jsonl(DATA / "slimpajama.jsonl")
    out = hf.load_slimpajama(DATA / "slimpajama.jsonl", cache_dir=cache)
    names = sorted({r["meta"]["redpajama_set_name"] for r in rows})
    assert out.label_names == tuple(names)
    assert [out.label_names[k] for k in out.labels] == [
        r["meta"]["redpajama_set_name"] for r in rows
    ]
    cats = ["RedPajamaGithub", "RedPajamaBook"]
    two = hf.load_slimpajama(DATA / "slimpajama.jsonl", categories=cats, limit=2, cache_dir=cache)
    assert two.label_names == tuple(cats)
    np.testing.assert_array_equal(np.bincount(two.labels), [2, 2])
    assert two.texts[0] == "import os\nprint(os.getcwd())"


def test_dolly_prompts_and_categories(cache):
    rows = _jsonl(DATA / "dolly.jsonl")
    out = hf.load_dolly(DATA / "dolly.jsonl", cache_dir=cache)
    assert out.targets == [r["response"] for r in rows]
    assert out.label_names == tuple(sorted({r["category"] for r in rows}))
    assert out.label_names[out.labels[0]] == "closed_qa"
    assert "### Input:\nVirgin Australia commenced" in out.prompts[0]
    assert "### Input:" not in out.prompts[1]
    assert out.prompts[1] == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName three primary colors.\n\n### Response:\n"
    )


def test_snli_concatenates_splits_and_drops_unlabelled(cache):
    out = hf.load_snli(DATA / "snli", cache_dir=cache)
    # train has one label -1 row; 3 + 2 + 1 labelled rows remain, in split order
    np.testing.assert_array_equal(out.labels, [0, 2, 1, 0, 2, 1])
    assert out.targets == ["Yes", "No", "Maybe", "Yes", "No", "Maybe"]
    assert out.prompts[0] == (
        'Suppose A man plays guitar. Can we infer that "A person makes music."? '
        "Yes, No, or Maybe?\n"
    )
    only_train = hf.load_snli(DATA / "snli" / "train.csv", cache_dir=cache)
    assert len(only_train.prompts) == 3
    # FedAMoLE's partition counts the unlabelled rows: kept with label -1 and no target.
    kept = hf.load_snli(DATA / "snli", cache_dir=cache, unlabelled=True)
    assert kept.labels.tolist().count(-1) == 1 and len(kept.labels) == 7
    assert kept.targets[kept.labels.tolist().index(-1)] == ""


@pytest.mark.parametrize("layout", ["github", "flat"])
def test_natural_instructions_top_tasks(layout, cache):
    source = DATA / "ni" if layout == "github" else DATA / "natural_instructions.jsonl"
    out = hf.load_natural_instructions(source, num_tasks=3, cache_dir=cache)
    # sizes: task001 3, task002 1, task020 2, task1000 2 -> task002 dropped; string order
    assert out.label_names == ("task001", "task020", "task1000")
    np.testing.assert_array_equal(np.bincount(out.labels), [3, 2, 2])
    assert out.prompts[0] == alpaca_prompt(
        "Write a question about the passage.", "task001_quoref_question_generation input 0"
    )
    assert out.targets[:3] == ["out 0", "out 1", "out 2"]
    # FedAMoLE "meta1": client i holds all instances of task i
    parts = specific(out.labels, 2, categories=[0, 1])
    assert [len(p) for p in parts] == [3, 2]


def test_offline_hub_id_fails_fast(cache):
    with pytest.raises(ConnectionError):
        hf.load_ag_news("fancyzhx/ag_news", cache_dir=cache)


def test_local_directory_errors(tmp_path, cache):
    (tmp_path / "d").mkdir()
    with pytest.raises(FileNotFoundError, match="no .* files under"):
        hf.load_rows(tmp_path / "d", cache_dir=cache)
    (tmp_path / "d" / "test.jsonl").write_text('{"text": "x", "label": 0}\n')
    with pytest.raises(FileNotFoundError, match="no file for split 'train'"):
        hf.load_rows(tmp_path / "d", cache_dir=cache)
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ValueError, match="unsupported data file"):
        hf.load_rows(tmp_path / "x.txt", cache_dir=cache)
