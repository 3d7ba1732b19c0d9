"""The Colab notebooks in colab/ are valid nbformat 4 and run top to bottom offline with tiny
settings (nbclient + ipykernel; a notebook's `parameters` cell is followed by an injected cell
with the CI values, as papermill does)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nbformat
import pytest

from tests.test_cli import TINY

ROOT = Path(__file__).resolve().parents[1]
COLAB = ROOT / "colab"


def load(name: str) -> nbformat.NotebookNode:
    return nbformat.read(COLAB / f"{name}.ipynb", as_version=4)


def parameters_index(nb: nbformat.NotebookNode) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "a notebook needs exactly one cell tagged 'parameters'"
    return tagged[0]


def run(name: str, parameters: dict[str, Any]) -> nbformat.NotebookNode:
    """Executes the notebook in colab/ (its working directory) with `parameters` injected."""
    from nbclient import NotebookClient

    nb = load(name)
    injected = "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    cell = nbformat.v4.new_code_cell(injected)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(parameters_index(nb) + 1, cell)
    client = NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(COLAB)}}
    )
    client.reset_execution_trackers()
    started = False
    try:
        with client.setup_kernel():
            started = True
            for index, code in enumerate(nb.cells):
                client.execute_cell(code, index)
    except Exception as e:
        if not started:
            pytest.fail(
                f"could not start a Jupyter kernel ('python3') to run {name}.ipynb: "
                f"{type(e).__name__}: {e}. The notebook tests need ipykernel and nbclient in this "
                "environment: pip install -e '.[test]'"
            )
        raise
    return nb


def outputs(nb: nbformat.NotebookNode) -> tuple[str, int]:
    """All text the notebook printed or displayed, and how many PNG images it displayed."""
    text, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            text.append(out.get("text", ""))
            data = out.get("data", {})
            text.append(data.get("text/plain", "") + data.get("text/markdown", ""))
            images += "image/png" in data
    return "".join(text), images


@pytest.mark.parametrize("name", ["quickstart", "aggregation_rules", "reproduce_table"])
def test_notebook_is_valid_and_clean(name):
    nb = load(name)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata.kernelspec.name == "python3"
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in first_code.metadata.get("tags", [])
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "commit without outputs"
    install = "\n".join(c.source for c in nb.cells if "%pip install" in c.source)
    assert 'find_spec("fedjax_lora") is None' in install  # skipped when already importable


def test_reproduce_table_parameters_start_with_smoke():
    nb = load("reproduce_table")
    assert nb.cells[parameters_index(nb)].source.startswith("SMOKE = True")


def test_quickstart_runs(tmp_path):
    nb = run(
        "quickstart",
        {
            "ROUNDS": 2,
            "METHODS": ["local", "fedavg", "pcl-val"],
            "OVERRIDES": TINY,
            "OUT": str(tmp_path / "quickstart"),
        },
    )
    text, images = outputs(nb)
    assert "| pcl-val |" in text and "g2c5" in text  # results table, 3 x 2 clients
    assert images == 2  # ppl.png, trust.png
    assert (tmp_path / "quickstart" / "metrics.jsonl").is_file()


def test_aggregation_rules_runs():
    nb = run("aggregation_rules", {"ROUNDS": 2, "OVERRIDES": TINY})
    text, images = outputs(nb)
    assert "self_weighted passes the battery" in text
    assert "row-stochastic mixing failed" in text  # the buggy rule is caught
    assert "self-weighted  mean validation perplexity" in text
    assert images == 2  # perplexity curves, mixing matrices


def test_reproduce_table_runs_in_smoke_mode(tmp_path):
    out = tmp_path / "table"
    methods = ["local", "pcl-fedavg", "pcl-val"]
    nb = run("reproduce_table", {"SMOKE": True, "METHODS": methods, "OUT": str(out)})
    text, images = outputs(nb)
    table = (out / "results.md").read_text()
    assert table.splitlines()[0] == "val_mean_ppl, mean ± std (seeds)"
    assert "| cell | local | pcl-fedavg | pcl-val |" in table.splitlines()
    assert "| multilingual-specific |" in table and table.strip() in text
    assert images == 1  # the cell's trust heatmaps
