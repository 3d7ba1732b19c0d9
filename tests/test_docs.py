"""The code in docs/adding_a_method.md runs and does what it says."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from fedjax_lora.algorithms import METHODS

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding_a_method.md"


def test_adding_a_method_walkthrough():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    namespace: dict = {}
    exec(blocks[0], namespace)
    n = 5
    tree = {"a": np.random.default_rng(0).normal(size=(n, 3, 2)).astype(np.float32)}
    aggregator = namespace["ring_average"]()
    mixed, state = aggregator.apply(tree, aggregator.init(tree))
    expected = np.zeros((n, n))
    for i in range(n):
        for j in (i - 1, i, i + 1):
            expected[i, j % n] = 1 / 3
    np.testing.assert_allclose(state.matrix, expected, atol=1e-6)
    np.testing.assert_allclose(
        mixed["a"], np.einsum("ij,j...->i...", expected, tree["a"]), atol=1e-5
    )
    try:
        exec(blocks[3], namespace)
        assert "ring" in METHODS
    finally:
        METHODS.pop("ring", None)
