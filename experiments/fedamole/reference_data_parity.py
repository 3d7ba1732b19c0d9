"""FedAMoLE's data protocol and ROUGE-L against the authors' own code (no torch needed).

Imports the reference's pure-NumPy partition (`data/hete_partition.py::partition_idx_dir`) and
split (`data/dataset.py::split_dataset`) from a checkout of `zyc140345/FedAMoLE` and replays
`main.py` + `ClientDataLoader.__init__` (seed, `K = np.unique(y).shape[0]`, per-client shuffle,
`get_ratios("0.95,0.05", eval, test)`, caps 200 / 200 / test) on SNLI- and Dolly-sized label
vectors for the seeds 42, 62, 82 × alpha 0.1, 1, 100; compares every client's train / aux / eval
/ test membership with `fedjax_lora.data.instruction` (`partition_examples`, `client_splits`).
ROUGE-L: the reference's `evaluation.rouge_score` rule (empty hypothesis 0, the pip `rouge`
package's `get_scores(...)[0]["rouge-l"]["f"]`, 0 on its ValueError) against
`engine.instruction.rouge_l` on text pairs of several kinds.

    python experiments/fedamole/reference_data_parity.py REF_DIR [--out results.json]

Writes `{"checks": [{"name", "max_abs_diff", "tolerance", "ok"}, ...]}` (for membership,
`max_abs_diff` is the number of examples placed differently).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import types
from pathlib import Path

import numpy as np

from fedjax_lora.data.instruction import client_splits, partition_examples
from fedjax_lora.engine.instruction import rouge_l

SEEDS = (42, 62, 82)
ALPHAS = (0.1, 1.0, 100.0)
NAMES = ("train", "aux", "val", "test")


class IndexSet:
    """The two members of `datasets.Dataset` that `split_dataset` uses, over an index list."""

    def __init__(self, idx):
        self.idx = np.asarray(idx)

    def __len__(self):
        return len(self.idx)

    def select(self, r):
        return IndexSet(self.idx[r.start : r.stop])


def import_reference(ref_dir: Path):
    """The reference's `partition_idx_dir` and `split_dataset`; `data/dataset.py` imports
    `datasets` and sklearn's `LabelEncoder` at module level, neither used by `split_dataset`:
    stubs stand in when they are not installed."""
    sys.path.insert(0, str(ref_dir))
    for name in ("datasets", "sklearn", "sklearn.preprocessing"):
        try:
            __import__(name)
        except ImportError:
            stub = types.ModuleType(name)
            stub.LabelEncoder = object
            sys.modules[name] = stub
    from data.dataset import split_dataset
    from data.hete_partition import partition_idx_dir

    return partition_idx_dir, split_dataset


def reference_sets(partition_idx_dir, split_dataset, y, seed, alpha, share, test_cap):
    np.random.seed(seed)
    random.seed(seed)
    rs = [0.95, 0.05]
    rs += [sum(rs[:2]) * share / (1 - 2 * share)] * 2
    ratios = [r / sum(rs) for r in rs]
    parts = partition_idx_dir(y, 10, alpha=alpha, num_classes=np.unique(y).shape[0])
    out = []
    for part in parts:
        np.random.shuffle(part)
        sets = split_dataset(IndexSet(part), ratios)
        idx = [np.zeros(0, np.int64) if s is None else s.idx for s in sets]
        out.append(
            dict(zip(NAMES, (idx[0], idx[1][:200], idx[2][:200], idx[3][:test_cap]), strict=True))
        )
    return out


def ours(y, seed, alpha, share, test_cap):
    state = np.random.RandomState(seed)
    return client_splits(
        partition_examples(y, 10, "dirichlet", alpha, state),
        val_fraction=share,
        test_fraction=share,
        aux_fraction=0.05,
        max_val=200,
        max_test=test_cap,
        seed=state,
    )


def misplaced(a: list[dict], b: list[dict]) -> int:
    """Examples not in the same client and split on both sides."""
    key = lambda sets: {(c, n, int(i)) for c, s in enumerate(sets) for n in NAMES for i in s[n]}
    return len(key(a) ^ key(b))


ROUGE_PAIRS = [
    ("The cat sat on the mat.", "the cat is on the mat"),
    ("Yes, the CAT sat.", "yes the cat sat"),
    ("Paris. It is the capital of France.", "The capital of France is Paris."),
    ("the the the cat", "the cat the dog"),
    ("1. Mix flour. 2. Add water. 3. Bake.", "Mix the flour, add water and bake it."),
    ("", "a reference"),
    ("...", "a reference"),
    ("   ", "a reference"),
    ("no overlap here", "entirely different words"),
]


def reference_rouge(hyp: str, ref: str) -> float:
    """`evaluation.rouge_score` after decoding: 0 for an empty hypothesis or a ValueError."""
    from rouge import Rouge

    if len(hyp) == 0:
        return 0.0
    try:
        return Rouge().get_scores([hyp], [ref])[0]["rouge-l"]["f"]
    except ValueError:
        return 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ref_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    partition_idx_dir, split_dataset = import_reference(args.ref_dir)
    rng = np.random.default_rng(0)
    # SNLI: 550,152 + 10,000 + 10,000 rows, 785 + 158 + 176 without a gold label (-1).
    snli = rng.choice([0, 1, 2], 570152)
    snli[rng.choice(snli.size, 1119, replace=False)] = -1
    dolly = rng.integers(0, 8, 15011)
    cells = {"snli": (snli, 10000 / 570152, 200), "dolly": (dolly, 0.1, 50)}
    checks = []
    for name, (y, share, cap) in cells.items():
        for seed in SEEDS:
            for alpha in ALPHAS:
                want = reference_sets(partition_idx_dir, split_dataset, y, seed, alpha, share, cap)
                diff = misplaced(want, ours(y, seed, alpha, share, cap))
                checks.append(
                    {
                        "name": f"{name}_partition_splits_seed{seed}_alpha{alpha}",
                        "max_abs_diff": float(diff),
                        "tolerance": 0.0,
                        "ok": diff == 0,
                    }
                )
    diff = max(abs(rouge_l(h, r) - reference_rouge(h, r)) for h, r in ROUGE_PAIRS)
    checks.append({"name": "rouge_l", "max_abs_diff": diff, "tolerance": 0.0, "ok": diff == 0})
    text = json.dumps({"checks": checks}, indent=1)
    if args.out:
        args.out.write_text(text)
    for c in checks:
        print(f"{'ok ' if c['ok'] else 'BAD'} {c['name']}: {c['max_abs_diff']:g}")
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
