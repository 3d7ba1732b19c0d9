"""Issue 15 as a user meets it: every bad input stops before compute with one line naming the
field or file (`fedjax-lora: error: ...`, exit 2), never a traceback or a silently wrong run."""

from __future__ import annotations

import re

import pytest

from fedjax_lora import config as config_lib
from fedjax_lora.cli import main
from fedjax_lora.errors import ConfigError, FedjaxLoraError


def error_line(capsys) -> str:
    """The CLI's stderr, checked to be one `fedjax-lora: error:` line without a traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedjax-lora: error: "), err
    return err[0]


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("optimizer.lr=.nan", "optimizer.lr"),
        ("optimizer.lr=.inf", "optimizer.lr"),
        ("optimizer.lr=1e309", "optimizer.lr"),
        ("optimizer.eps=0", "optimizer.eps"),
        ("optimizer.b1=1.5", "optimizer.b1"),
        ("optimizer.b2=1", "optimizer.b2"),
        ("optimizer.weight_decay=-0.1", "optimizer.weight_decay"),
        ("optimizer.grad_clip=-1", "optimizer.grad_clip"),
        ("lora.alpha=0", "lora.alpha"),
        ("lora.alpha=.nan", "lora.alpha"),
        ("model.dropout=1.5", "model.dropout"),
        ("model.d_ff=0", "model.d_ff"),
        ("model.n_heads=0", "model.n_heads"),
        ("model.n_heads=3", "model.n_heads"),  # 64 is not divisible by 3
        ("data.val_fraction=-0.1", "data.val_fraction"),
        ("data.test_fraction=2", "data.test_fraction"),
        ("data.aux_fraction=-0.5", "data.aux_fraction"),
        ("data.test_fraction=0.95", "data.test_fraction"),  # nothing left to train on
        ("trust.temperature=0", "trust.temperature"),
        ("trust.top_peers=0", "trust.top_peers"),
        ("seed=1180591620717411303424", "seed"),  # 2**70
        ("lora.targets=5", "lora.targets"),
        ("model.vocab_size=-1", "model.vocab_size"),
        ("training.seq_len=1000", "training.seq_len"),  # above model.max_positions
        ("data.train_fractions=[0.5,1.5]", "data.train_fractions[1]"),
    ],
)
def test_out_of_range_values_stop_before_compute_naming_the_field(override, field, capsys, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"'{field}'")):
        config_lib.load(None, [override])
    assert main(["demo", "--out", str(tmp_path / "run"), "--set", override]) == 2
    assert field in error_line(capsys)
    assert not (tmp_path / "run").exists()  # nothing was built or written


def test_the_error_types_are_value_errors():
    assert issubclass(ConfigError, FedjaxLoraError) and issubclass(FedjaxLoraError, ValueError)


def test_malformed_yaml_is_one_line_naming_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("rounds: 2\nmethods: [local\n")
    assert main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
    line = error_line(capsys)
    assert "bad.yaml" in line and "not valid YAML at line" in line
    assert main(["demo", "--out", str(tmp_path / "o"), "--set", "methods=[local"]) == 2
    assert "--set methods=[local is not valid YAML" in error_line(capsys)


def test_out_naming_an_existing_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("x")
    assert main(["demo", "--out", str(path)]) == 2
    assert "is an existing file" in error_line(capsys)


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    from fedjax_lora import cli

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run", interrupt)
    assert main(["demo", "--out", str(tmp_path / "o")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted" in err[0] and "Traceback" not in err[0]
