"""Loaders for the papers' datasets through Hugging Face `datasets`.

Every loader takes `source`: a hub id (used online; honours `HF_DATASETS_OFFLINE` /
`HF_HUB_OFFLINE` and the cache) or a local file or directory of json/jsonl/parquet/csv files
shaped like the real dataset (a directory may hold one file set per split, named after the split:
`train.jsonl`, `test-00000.parquet`, ...). `limit` keeps the first `limit` kept rows;
`streaming=True` reads lazily (large hub datasets). `cache_dir` is passed to `load_dataset`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import numpy as np

from fedjax_lora.data.prompts import SNLI_CHOICES, alpaca_prompt, snli_prompt
from fedjax_lora.errors import DataError

AG_NEWS = "fancyzhx/ag_news"
AG_NEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")
WIKIPEDIA = "wikimedia/wikipedia"
WIKIPEDIA_DATE = "20231101"
GITHUB_CODE = "codeparrot/github-code-clean"
SLIMPAJAMA = "cerebras/SlimPajama-627B"
DOLLY = "databricks/databricks-dolly-15k"
SNLI = "stanfordnlp/snli"
NATURAL_INSTRUCTIONS = "Muennighoff/natural-instructions"

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_SPLIT_NAMES = ("train", "validation", "test")


class LabeledTexts(NamedTuple):
    """Texts with integer labels; `label_names[k]` names label k."""

    texts: list[str]
    labels: np.ndarray  # int64 [n]
    label_names: tuple[str, ...]


class LabeledPairs(NamedTuple):
    """(prompt, target) examples with integer labels (task/category/class)."""

    prompts: list[str]
    targets: list[str]
    labels: np.ndarray  # int64 [n]
    label_names: tuple[str, ...]


def _builder(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in _BUILDERS:
        raise ValueError(f"unsupported data file {path}; use one of {sorted(_BUILDERS)}")
    return _BUILDERS[suffix]


def _local_files(path: Path, split: str) -> list[Path]:
    """The files of `split` in a local directory (all files if none is named after a split)."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _BUILDERS)
    if not files:
        raise FileNotFoundError(f"no {sorted(_BUILDERS)} files under {path}")

    def split_of(p: Path) -> str | None:
        stem = p.name.split(".")[0]
        return next((s for s in _SPLIT_NAMES if stem == s or stem.startswith(f"{s}-")), None)

    named = [p for p in files if split_of(p) == split]
    if named:
        return named
    if all(split_of(p) is None for p in files):
        return files
    raise FileNotFoundError(f"no file for split {split!r} under {path}; found {files}")


def load_rows(
    source: str | Path,
    *,
    name: str | None = None,
    split: str = "train",
    streaming: bool = False,
    cache_dir: str | Path | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """One split of a hub dataset (config `name`) or of local files (a single local file is the
    whole dataset, whatever `split`)."""
    cache = None if cache_dir is None else str(cache_dir)
    path = Path(source)
    if path.exists():
        files = [path] if path.is_file() else _local_files(path, split)
        builders = {_builder(p) for p in files}
        if len(builders) != 1:
            raise ValueError(f"mixed file formats under {path}: {sorted(builders)}")
        return datasets.load_dataset(
            builders.pop(),
            data_files={"train": [str(p) for p in files]},
            split="train",
            streaming=streaming,
            cache_dir=cache,
        )
    return datasets.load_dataset(
        str(source), name, split=split, streaming=streaming, cache_dir=cache
    )


def _require_fields(rows: list[dict], fields: Sequence[str], what: str) -> None:
    """Raises `DataError` naming `what`, the first row lacking one of `fields` (absent or null)
    and the field; also when there are no rows at all."""
    if not rows:
        raise DataError(f"{what} holds no rows")
    for i, row in enumerate(rows):
        missing = [f for f in fields if row.get(f) is None]
        if missing:
            raise DataError(f"{what}: row {i} lacks the field(s) {missing}; rows need {fields}")


def _take(
    rows: Any, limit: int | None, keep: Callable[[dict], bool] | None = None
) -> Iterator[dict]:
    """Iterate rows (dicts), keeping those `keep` accepts, stopping after `limit`."""
    count = 0
    for row in rows:
        if limit is not None and count >= limit:
            return
        if keep is None or keep(row):
            count += 1
            yield row


def _encode_labels(
    values: Sequence[str], names: Sequence[str] | None = None
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Integer labels for string categories: index in `names` (default: sorted unique values)."""
    names = tuple(sorted(set(values))) if names is None else tuple(names)
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[v] for v in values], dtype=np.int64), names


def load_ag_news(
    source: str | Path = AG_NEWS,
    *,
    split: str = "train",
    limit: int | None = None,
    streaming: bool = False,
    cache_dir: str | Path | None = None,
) -> LabeledTexts:
    """AG News: `text` and `label` (0 World, 1 Sports, 2 Business, 3 Sci/Tech)."""
    rows = list(
        _take(load_rows(source, split=split, streaming=streaming, cache_dir=cache_dir), limit)
    )
    labels = np.array([int(r["label"]) for r in rows], dtype=np.int64)
    return LabeledTexts([r["text"] for r in rows], labels, AG_NEWS_LABELS)


def load_wikipedia(
    language: str,
    source: str | Path = WIKIPEDIA,
    *,
    date: str = WIKIPEDIA_DATE,
    split: str = "train",
    limit: int | None = None,
    streaming: bool = False,
    cache_dir: str | Path | None = None,
) -> list[str]:
    """Article texts (`text` field) of one language's Wikipedia (hub config `<date>.<language>`;
    a local source is taken to be that language's articles already)."""
    name = None if Path(source).exists() else f"{date}.{language}"
    rows = load_rows(source, name=name, split=split, streaming=streaming, cache_dir=cache_dir)
    return [r["text"] for r in _take(rows, limit)]


def load_github_code(
    source: str | Path = GITHUB_CODE,
    *,
    language: str = "Java",
    split: str = "train",
    limit: int | None = None,
    streaming: bool = True,
    cache_dir: str | Path | None = None,
) -> list[str]:
    """Source files (`code`) whose `language` field equals `language` (github-code layout)."""
    rows = load_rows(source, split=split, streaming=streaming, cache_dir=cache_dir)
    return [r["code"] for r in _take(rows, limit, lambda r: r["language"] == language)]


def load_slimpajama(
    source: str | Path = SLIMPAJAMA,
    *,
    categories: Sequence[str] | None = None,
    split: str = "train",
    limit: int | None = None,
    streaming: bool = True,
    cache_dir: str | Path | None = None,
) -> LabeledTexts:
    """SlimPajama texts labelled by `meta.redpajama_set_name` (e.g. `RedPajamaGithub`).

    `categories` keeps only those sets and fixes the label order; by default all sets present,
    sorted. `limit` counts rows per category when `categories` is given, else in total.
    """
    rows = load_rows(source, split=split, streaming=streaming, cache_dir=cache_dir)
    set_name = lambda r: r["meta"]["redpajama_set_name"]
    if categories is None:
        kept = list(_take(rows, limit))
    else:
        wanted = set(categories)
        counts = dict.fromkeys(categories, 0)
        kept = []
        for r in rows:
            c = set_name(r)
            if c in wanted and (limit is None or counts[c] < limit):
                counts[c] += 1
                kept.append(r)
            if limit is not None and all(v >= limit for v in counts.values()):
                break
    labels, names = _encode_labels([set_name(r) for r in kept], categories)
    return LabeledTexts([r["text"] for r in kept], labels, names)


def load_dolly(
    source: str | Path = DOLLY,
    *,
    limit: int | None = None,
    cache_dir: str | Path | None = None,
) -> LabeledPairs:
    """Dolly-15k as (Alpaca prompt, response) pairs labelled by `category` (sorted names)."""
    try:
        rows = list(_take(load_rows(source, cache_dir=cache_dir), limit))
    except (StopIteration, ValueError, KeyError) as e:  # an empty or malformed local file
        raise DataError(f"Dolly source {source}: no readable rows ({type(e).__name__})") from None
    _require_fields(rows, ("instruction", "response", "category"), f"Dolly {source}")
    labels, names = _encode_labels([r["category"] for r in rows])
    prompts = [alpaca_prompt(r["instruction"], r["context"] or "") for r in rows]
    return LabeledPairs(prompts, [r["response"] for r in rows], labels, names)


def load_snli(
    source: str | Path = SNLI,
    *,
    splits: Sequence[str] = _SPLIT_NAMES,
    limit: int | None = None,
    cache_dir: str | Path | None = None,
    unlabelled: bool = False,
) -> LabeledPairs:
    """SNLI as (prompt, "Yes"/"Maybe"/"No") pairs, the given splits concatenated (FedAMoLE uses
    all three); rows with label -1 (no gold label) are dropped, or, with `unlabelled`, kept with
    label -1 and target "" (FedAMoLE's partition counts them before dropping them,
    `fedjax_lora.data.instruction`). `limit` counts the rows kept."""
    if Path(source).is_file():
        splits = ("train",)
    rows: list[dict] = []
    for split in splits:
        rows += list(_take(load_rows(source, split=split, cache_dir=cache_dir), None))
    low = -1 if unlabelled else 0
    rows = list(_take(rows, limit, lambda r: low <= int(r["label"]) < len(SNLI_CHOICES)))
    labels = np.array([int(r["label"]) for r in rows], dtype=np.int64)
    prompts = [snli_prompt(r["premise"], r["hypothesis"]) for r in rows]
    targets = [SNLI_CHOICES[k] if k >= 0 else "" for k in labels]
    return LabeledPairs(prompts, targets, labels, SNLI_CHOICES)


def _ni_github_rows(root: Path, task_list: str) -> list[dict]:
    """Rows of the GitHub `allenai/natural-instructions` layout (`tasks/*.json` + a task list)."""
    names = [line.strip() for line in (root / task_list).read_text().splitlines() if line.strip()]
    rows = []
    for task in names:
        raw = json.loads((root / "tasks" / f"{task}.json").read_text())
        definition = raw["Definition"][0]
        rows += [
            {
                "task_name": task,
                "definition": definition,
                "inputs": inst["input"],
                "targets": inst["output"][0],
            }
            for inst in raw["Instances"]
        ]
    return rows


def load_natural_instructions(
    source: str | Path = NATURAL_INSTRUCTIONS,
    *,
    num_tasks: int = 100,
    task_list: str = "splits/default/train_tasks.txt",
    split: str = "train",
    cache_dir: str | Path | None = None,
) -> LabeledPairs:
    """Natural Instructions v2 as (Alpaca prompt, first output) pairs labelled by task id.

    `source` is a checkout of the GitHub repo (`tasks/*.json`; the tasks listed in `task_list`),
    or a hub id / file with flat rows `task_name, definition, inputs, targets`. Keeps the
    `num_tasks` tasks with the most instances (FedAMoLE: 100); the label is the `taskNNN` prefix,
    label-encoded in string order (FedAMoLE's "meta1": client i = label i).
    """
    path = Path(source)
    if (path / "tasks").is_dir():
        rows = _ni_github_rows(path, task_list)
    else:
        rows = list(_take(load_rows(source, split=split, cache_dir=cache_dir), None))
    tasks = [r["task_name"] for r in rows]
    names, sizes = np.unique(tasks, return_counts=True)
    top = set(names[np.argsort(-sizes, kind="stable")[:num_tasks]].tolist())
    rows = [r for r in rows if r["task_name"] in top]
    labels, label_names = _encode_labels([r["task_name"].split("_")[0] for r in rows])
    prompts = [alpaca_prompt(r["definition"], r["inputs"]) for r in rows]
    targets = [r["targets"] if isinstance(r["targets"], str) else r["targets"][0] for r in rows]
    return LabeledPairs(prompts, targets, labels, label_names)
