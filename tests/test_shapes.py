"""The jaxtyping shape annotations hold: the aggregation battery over the registry, the loss and
the batch functions run with every annotated function checked at run time (jaxtyping's import
hook with beartype), and a wrong shape is refused. A subprocess, since the hook only decorates
modules imported after it is installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("beartype")
ROOT = Path(__file__).resolve().parents[1]

CHECKED = """
import jax, jax.numpy as jnp, numpy as np
from jaxtyping import TypeCheckError, install_import_hook

with install_import_hook(
    ["fedjax_lora.aggregation", "fedjax_lora.engine.loss", "fedjax_lora.engine.batches",
     "fedjax_lora.engine.evaluate", "fedjax_lora.lora"],
    "beartype.beartype",
):
    import fedjax_lora.aggregation as agg
    from fedjax_lora.aggregation import rsea, trust
    from fedjax_lora.aggregation.testing import check_aggregator
    from fedjax_lora.engine import batches, evaluate, loss

for name, entry in sorted(agg.AGGREGATORS.items()):
    check_aggregator(
        entry.factory,
        example_inputs=entry.example_inputs,
        num_clients=5,  # Krum needs N > 2f + 2
        properties=entry.properties,
        name=name,
    )

rng = np.random.default_rng(0)
held = rsea.assign(rng.random((4, 4)), clients_per_expert=2, min_experts=2, max_experts=2)
rsea.scores(rng.random((4, 3)), rng.random((4, 4, 3)), held.T)
ce = loss.token_cross_entropy(jnp.zeros((2, 3, 7)), jnp.zeros((2, 3), jnp.int32))
assert ce.shape == (2, 3)
batch = batches.windows_at(jnp.arange(20), jnp.array([0, 5]), 4, None)
assert batch.inputs.shape == (2, 4)
starts = batches.sample_starts(
    jax.random.key(0), jnp.int32(20), jnp.int32(0),
    batch_size=3, seq_len=4, max_windows=8, sampling="epoch",
)
assert starts.shape == (3,)
evaluate.summarize({"ce_sum": jnp.ones(4), "tokens": jnp.ones(4), "correct": jnp.ones(4)})

refused = []
for call in (
    lambda: trust.softmax_trust(np.zeros((3, 4), np.float32)),  # not square
    lambda: trust.oracle_trust(np.zeros((3,), np.float32)),  # not [n, k]
    lambda: loss.token_cross_entropy(jnp.zeros((2, 3, 7)), jnp.zeros((2, 4), jnp.int32)),
):
    try:
        call()
    except TypeCheckError:
        refused.append(True)
print("checked", len(agg.AGGREGATORS), "aggregators; refused", len(refused))
"""


def test_annotations_hold_under_a_runtime_checker():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", CHECKED], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("refused 3"), result.stdout
