"""Issue 15 as a user meets it: every bad input stops before compute with one line naming the
field or file (`fedjax-lora: error: ...`, exit 2), never a traceback or a silently wrong run."""

from __future__ import annotations

import json
import re
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from fedjax_lora import config as config_lib
from fedjax_lora.cli import main
from fedjax_lora.errors import ConfigError, FedjaxLoraError
from tests.test_cli import TINY


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
        ("data.train_fractions=[0.5,1.5]", "data.train_fractions[1]"),
    ],
)
def test_out_of_range_values_stop_before_compute_naming_the_field(
    override, field, capsys, tmp_path
):
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


# --- resume (points 1, 2) ------------------------------------------------------------------------

TINY_RUN = [*TINY, "methods=[local]", "data.num_groups=2", "data.clients_per_group=1"]


def demo(out, *args, rounds=2):
    return main(["demo", "--rounds", str(rounds), "--out", str(out), "--no-progress", *args])


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A finished 2-round run with checkpoints, copied for each test that resumes it."""
    out = tmp_path_factory.mktemp("short") / "run"
    assert demo(out, "--checkpoint-every", "1", "--set", *TINY_RUN) == 0
    return out


@pytest.mark.parametrize(
    "change",
    [
        "optimizer.lr=0.02",
        "training.steps=3",
        "training.batch_size=2",
        "lora.alpha=8",
        "seed=1",
        "data.seed=1",
        "data.overlap=0.5",
        "training.seq_len=8",
        "optimizer.weight_decay=0.1",
        "optimizer.name=adam",
        "lora.targets=[c_attn]",
        "model.vocab_size=128",
    ],
)
def test_resume_refuses_a_changed_setting_naming_it_with_both_values(
    short_run, tmp_path, capsys, change
):
    out = tmp_path / "run"
    shutil.copytree(short_run, out)
    before = (out / "metrics.jsonl").read_text()
    assert demo(out, "--resume", "--set", *TINY_RUN, change, rounds=3) == 2
    line = error_line(capsys)
    field, value = change.split("=")
    assert f"{field}: " in line and "->" in line and "only rounds" in line, line
    assert (out / "metrics.jsonl").read_text() == before  # nothing ran


def test_resume_accepts_more_rounds_and_presentation_changes(short_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(short_run, out)
    args = [*TINY_RUN, "tracking.tensorboard=false", "tracking.progress=false"]
    assert demo(out, "--resume", "--checkpoint-every", "2", "--set", *args, rounds=3) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    rounds = [json.loads(line)["round"] for line in lines]
    assert rounds == [0, 1, 2, 3]
    assert json.loads((out / "config.json").read_text())["rounds"] == 3


def test_resume_with_nothing_to_resume_stops_unless_asked_to_start_fresh(tmp_path, capsys):
    assert demo(tmp_path / "typo", "--resume", "--set", *TINY_RUN) == 2
    assert "nothing to resume" in error_line(capsys)
    assert not (tmp_path / "typo").exists()
    # a first run without --checkpoint-every leaves nothing to resume either
    assert demo(tmp_path / "nockpt", "--set", *TINY_RUN) == 0
    capsys.readouterr()
    assert demo(tmp_path / "nockpt", "--resume", "--set", *TINY_RUN) == 2
    assert "nothing to resume" in error_line(capsys)
    assert demo(tmp_path / "nockpt", "--resume=if-any", "--set", *TINY_RUN) == 0


def test_resume_when_every_checkpoint_is_unreadable_stops(short_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(short_run, out)
    for f in (out / "checkpoints").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    assert demo(out, "--resume", "--set", *TINY_RUN, rounds=3) == 2
    assert "every checkpoint of method 'local'" in error_line(capsys)


# --- divergence (point 3) ------------------------------------------------------------------------


@pytest.mark.parametrize("lr", ["1e6", "1e17"])
def test_divergence_to_uniform_predictions_stops_naming_method_clients_round(tmp_path, capsys, lr):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")  # an earlier run's: must not outlive this one
    assert demo(out, "--set", *TINY_RUN, f"optimizer.lr={lr}") == 2
    line = error_line(capsys)
    assert re.search(r"method 'local': .* client\(s\) \['g0c0', 'g1c1'\] in round [12]: ", line)
    assert "collapsed to uniform" in line
    assert not (out / "summary.json").exists()


def test_divergence_rule_against_a_numpy_reference():
    from fedjax_lora.experiment import diverged_clients

    v = 64
    ln_v = float(np.log(v))
    train = np.array([[3.9, 3.8], [4.2, ln_v], [9.0, 3.0], [3.0, ln_v]])
    val = np.array([3.7, ln_v, 3.9, 3.5])
    collapsed, exploded = diverged_clients(train, val, np.arange(4), v)
    # client 1: last step and validation at ln V; client 3: only training at ln V (not collapsed);
    # client 2: a step above 2 ln V = 8.32
    assert collapsed.tolist() == [1] and exploded.tolist() == [2]


# --- checkpoint bit rot (point 9) ----------------------------------------------------------------


def _flip_a_byte_in_every_data_file(step_dir):
    for f in (step_dir / "state").rglob("d/*"):
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x10
        f.write_bytes(bytes(data))


def test_a_flipped_checkpoint_byte_is_detected_and_the_previous_checkpoint_used(
    short_run, tmp_path, caplog, capfd
):
    reference = tmp_path / "reference"
    shutil.copytree(short_run, reference)
    assert demo(reference, "--resume", "--checkpoint-every", "1", "--set", *TINY_RUN, rounds=3) == 0
    out = tmp_path / "run"
    shutil.copytree(short_run, out)
    _flip_a_byte_in_every_data_file(out / "checkpoints" / "local" / "2")
    assert demo(out, "--resume", "--checkpoint-every", "1", "--set", *TINY_RUN, rounds=3) == 0
    assert "checkpoints/local/2 is unreadable" in caplog.text
    assert "Traceback" not in capfd.readouterr().err  # no orbax traceback of the failed read
    summary = lambda d: json.loads((d / "summary.json").read_text())
    assert summary(out) == summary(reference)  # resumed from round 1, same numbers


def test_a_full_disk_stops_with_one_line_and_resume_uses_the_last_complete_checkpoint(
    short_run, tmp_path, monkeypatch, capfd
):
    """The second checkpoint's write fails with ENOSPC (the records file, written by orbax while
    its array writes are in flight): one line naming the directory and the fix, exit 2, no
    traceback; round 1 stays the newest checkpoint and `--resume` finishes the run exactly."""
    import errno

    from etils.epath import gpath

    write_text = gpath._GPath.write_text
    writes = []

    def full_disk(path, *args, **kwargs):
        if path.name == "metadata" and "records" in str(path):
            writes.append(path)
            if len(writes) >= 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return write_text(path, *args, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(gpath._GPath, "write_text", full_disk)
    assert demo(out, "--checkpoint-every", "1", "--set", *TINY_RUN) == 2
    monkeypatch.setattr(gpath._GPath, "write_text", write_text)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedjax-lora: error: "), lines
    assert f"round 2 to {out / 'checkpoints' / 'local'}" in lines[0]
    assert "No space left on device" in lines[0] and "free disk space" in lines[0]
    steps = [p.name for p in (out / "checkpoints" / "local").iterdir() if p.name.isdigit()]
    assert steps == ["1"]  # nothing of round 2 that a resume would pick
    assert demo(out, "--resume", "--checkpoint-every", "1", "--set", *TINY_RUN) == 0
    assert not list((out / "checkpoints" / "local").glob("*tmp*"))  # leftovers removed
    summary = lambda d: json.loads((d / "summary.json").read_text())
    assert summary(out) == summary(short_run)  # resumed from round 1, same numbers


def test_checkpoint_checksum_catches_a_changed_value(tmp_path, caplog):
    import jax.numpy as jnp

    from fedjax_lora.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path, keep=3)
    state = {"w": jnp.arange(4.0)}
    ckpt.save(1, state, [{"round": 1}])
    ckpt.save(2, {"w": jnp.arange(4.0) + 1}, [{"round": 2}])
    # rewrite round 2's records with a wrong checksum: the values no longer match what was saved
    meta = next((tmp_path / "2" / "records").glob("*"))
    assert meta.name == "metadata"
    doc = json.loads(meta.read_text())
    doc["sha256"] = "0" * 64
    meta.write_text(json.dumps(doc))
    step, restored, records = ckpt.restore_latest(state)
    assert step == 1 and records == [{"round": 1}]
    np.testing.assert_array_equal(restored["w"], np.arange(4.0))
    assert "do not match the checksum" in caplog.text
    doc.pop("records")  # records={}: unreadable, not a KeyError
    meta.write_text(json.dumps(doc))
    assert ckpt.restore_latest(state)[0] == 1
    ckpt.close()


# --- absurd sizes (point 8) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "override",
    [
        "model.n_layers=100000",
        "model.max_positions=1000000000000",
        "data.tokens_per_client=1000000000000",
        "model.d_model=65536",
    ],
)
def test_absurd_sizes_are_refused_before_allocation_saying_how_much(override, tmp_path, capsys):
    from fedjax_lora.memory import host_memory_bytes

    assert main(["demo", "--out", str(tmp_path / "run"), "--set", override]) == 2
    line = error_line(capsys)
    needed = float(re.search(r"needs about ([\d.]+) GiB", line).group(1))
    assert needed * 2**30 > host_memory_bytes()


def test_parameter_count_against_the_fixture_models():
    from fedjax_lora import models
    from fedjax_lora.memory import parameter_count
    from tests.test_models import FIXTURES

    for name in ("gpt2", "llama", "qwen2"):
        model = models.load(FIXTURES / name)
        real = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        estimate = parameter_count(model.config)  # an upper bound within biases and GQA
        assert real * 0.8 <= estimate <= real * 1.6, (name, real, estimate)


# --- model files through the CLI (points 5, 6, 7) -----------------------------------------------


def _gpt2_copy(tmp_path):
    from tests.test_models import FIXTURES

    d = tmp_path / "gpt2"
    shutil.copytree(FIXTURES / "gpt2", d)
    return d


def _model_error(tmp_path, capsys, source) -> str:
    argv = ["demo", "--out", str(tmp_path / "run"), "--set", f"model.source={source}"]
    assert main(argv) == 2
    return error_line(capsys)


def test_index_path_traversal_is_refused_through_the_cli(tmp_path, capsys):
    d = _gpt2_copy(tmp_path)
    (d / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    names = list(json.loads((tmp_path / "elsewhere.safetensors").read_bytes()[8:2624]))
    weight_map = {n: "../elsewhere.safetensors" for n in names if n != "__metadata__"}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    line = _model_error(tmp_path, capsys, d)
    assert "outside the checkpoint directory" in line and "model.safetensors.index.json" in line


def test_garbage_weights_are_refused_at_load_through_the_cli(tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    d = _gpt2_copy(tmp_path)
    state = load_file(d / "model.safetensors")
    name = "transformer.h.0.ln_1.weight"
    for bad, words in [
        (state[name].astype(np.int32), "not floating point"),
        (state[name].astype(np.bool_), "not floating point"),
        (np.full_like(state[name], np.nan), "NaN or infinite"),
    ]:
        save_file({**state, name: bad}, d / "model.safetensors")
        line = _model_error(tmp_path, capsys, d)
        assert words in line and name in line and str(d) in line
    save_file(
        {**state, "lm_head.weight": state["transformer.wte.weight"] + 1}, d / "model.safetensors"
    )
    assert "tie_word_embeddings" in _model_error(tmp_path, capsys, d)


def test_malformed_model_files_are_one_line_naming_the_file(tmp_path, capsys):
    d = _gpt2_copy(tmp_path)
    config = json.loads((d / "config.json").read_text())
    for text, words in [
        (
            json.dumps({k: v for k, v in config.items() if k != "n_embd"}),
            "lacks the field 'n_embd'",
        ),
        (json.dumps({**config, "n_head": 0}), "n_head"),
        ("[]", "top level must be an object"),
        ("null", "top level must be an object"),
    ]:
        (d / "config.json").write_text(text)
        line = _model_error(tmp_path, capsys, d)
        assert "config.json" in line and words in line, line
    (d / "config.json").write_text(json.dumps(config))
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 3])
    assert "is not a readable safetensors file" in _model_error(tmp_path, capsys, d)
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    assert "broken.gguf" in _model_error(tmp_path, capsys, gguf)


# --- token data (point 10) ---------------------------------------------------------------------


def test_out_of_vocabulary_validation_ids_are_refused_before_compute():
    from fedjax_lora.algorithms.problem import check_eval_vocab
    from fedjax_lora.errors import DataError

    windows = np.zeros((2, 3, 9), np.int32)
    check_eval_vocab(windows, 64, "val")
    windows[1, 2, 4] = 64
    with pytest.raises(DataError, match=r"evaluation set 'val' holds token id 64, outside"):
        check_eval_vocab(windows, 64, "val")
    windows[1, 2, 4] = -3
    with pytest.raises(DataError, match=r"token id -3"):
        check_eval_vocab(windows, 64, "val")


def test_dolly_files_without_rows_or_responses_are_one_clear_error(tmp_path):
    from fedjax_lora.data.datasets_hf import load_dolly
    from fedjax_lora.errors import DataError

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.jsonl"):
        load_dolly(empty)
    partial = tmp_path / "partial.jsonl"
    row = {"instruction": "Say hi", "context": "", "category": "open_qa"}
    partial.write_text(json.dumps({**row, "response": "hi"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"partial.jsonl: row 1 lacks the field\(s\)"):
        load_dolly(partial)


def test_resume_differences_treat_fields_the_saved_run_predates_as_defaults():
    saved = config_lib.to_dict(config_lib.load(None, ["optimizer.lr=0.05"]))
    del saved["data"]["encodings"]  # a run written before the field existed
    assert config_lib.resume_differences(saved, config_lib.load(None, ["optimizer.lr=0.05"])) == []
    changed = config_lib.resume_differences(saved, config_lib.load(None, ["rounds=20"]))
    assert changed == ["optimizer.lr: 0.05 -> 0.01"]  # rounds may change, lr may not


def test_resume_differences_compare_method_options_by_their_entries():
    options = ["method_options.comigs.router_batches=windows"]
    saved = config_lib.to_dict(config_lib.load(None, options))
    assert config_lib.resume_differences(saved, config_lib.load(None, options)) == []
    changed = config_lib.resume_differences(saved, config_lib.load(None, []))
    assert changed == ["method_options.comigs.router_batches: 'windows' -> '(unset)'"]
    unset = config_lib.to_dict(config_lib.load(None, []))
    changed = config_lib.resume_differences(unset, config_lib.load(None, options))
    assert changed == ["method_options.comigs.router_batches: '(unset)' -> 'windows'"]
