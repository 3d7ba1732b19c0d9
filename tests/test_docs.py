"""The code in docs/adding_a_method.md runs and does what it says; docs/api.md is current."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

from fedjax_lora.algorithms import METHODS

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "adding_a_method.md"


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
    exec(blocks[1], namespace)  # check_aggregator on it passes
    with pytest.raises(AssertionError, match="permutation equivariance"):
        namespace["check_aggregator"](namespace["ring_average"], namespace["np_ring"])
    try:
        exec(blocks[4], namespace)
        assert "ring" in METHODS
    finally:
        METHODS.pop("ring", None)


def test_api_reference_is_current():
    """docs/api.md is what scripts/make_api_docs.py renders from the code (regenerate it with
    `python scripts/make_api_docs.py` after changing an aggregator or a method)."""
    spec = importlib.util.spec_from_file_location(
        "make_api_docs", ROOT / "scripts/make_api_docs.py"
    )
    make_api_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_api_docs)
    text = make_api_docs.render()
    assert (ROOT / "docs" / "api.md").read_text() == text, (
        "docs/api.md is stale: run `python scripts/make_api_docs.py` and commit the result"
    )
    # every registered method and every registered aggregator's factory is documented
    for name in METHODS:
        assert f"### `{name}`" in text
    assert "#### `check_aggregator`" in text and "#### `trust_aggregator`" in text
