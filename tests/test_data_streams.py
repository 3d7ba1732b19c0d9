"""Token streams: stacking, evaluation windows, reference windows, memmapped files."""

import json

import numpy as np
import pytest

from fedjax_lora.data.streams import (
    ClientTokens,
    eval_window_starts,
    eval_windows,
    gather_windows,
    open_stream,
    reference_windows,
    sidecar_path,
    stack_streams,
    write_stream,
)


def test_stack_streams_pads_with_zero_and_keeps_masks():
    a, b = np.arange(1, 6), np.arange(10, 13)
    ct = stack_streams([a, b], loss_masks=[np.ones(5), np.array([0, 1, 1])])
    assert ct.tokens.dtype == np.int32 and ct.tokens.shape == (2, 5)
    np.testing.assert_array_equal(ct.tokens[1], [10, 11, 12, 0, 0])
    np.testing.assert_array_equal(ct.lengths, [5, 3])
    np.testing.assert_array_equal(ct.loss_mask[1], [0, 1, 1, 0, 0])
    np.testing.assert_array_equal(ct.stream(1), b)
    assert stack_streams([a]).loss_mask is None


def test_stack_streams_rejects_mask_shape_mismatch():
    with pytest.raises(ValueError, match="loss mask shape"):
        stack_streams([np.arange(4)], loss_masks=[np.ones(3)])


def _ct(lengths):
    return stack_streams([np.arange(100 * i, 100 * i + n) for i, n in enumerate(lengths)])


def test_eval_windows_match_hand_computed_slots():
    seq_len = 4
    ct = _ct([41, 13, 9])  # slots (L-1)//4 = 10, 3, 2
    windows, valid = eval_windows(ct, seq_len, max_windows=5)
    assert windows.shape == (3, 5, 5) and windows.dtype == np.int32
    # client 0: 10 slots, 5 windows -> slots 0, 2, 4, 6, 8 -> starts 0, 8, 16, 24, 32
    for w, start in enumerate([0, 8, 16, 24, 32]):
        np.testing.assert_array_equal(windows[0, w], np.arange(start, start + 5))
    np.testing.assert_array_equal(valid, [[1] * 5, [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(windows[1, 2], 100 + np.arange(8, 13))
    assert not windows[1, 3:].any() and not windows[2, 2:].any()


def test_eval_windows_reproducible_in_bounds_and_target_disjoint():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 500, size=7)
    ct = _ct(lengths)
    seq_len = 8
    w1, v1 = eval_windows(ct, seq_len, 16)
    w2, v2 = eval_windows(ct, seq_len, 16)
    np.testing.assert_array_equal(w1, w2)
    np.testing.assert_array_equal(v1, v2)
    starts, valid = eval_window_starts(ct.lengths, seq_len, 16)
    for i in range(len(lengths)):
        s = starts[i, valid[i]]
        assert np.all(s + seq_len + 1 <= lengths[i])
        # the target positions s+1..s+seq_len of different windows never repeat
        targets = (s[:, None] + np.arange(1, seq_len + 1)).ravel()
        assert len(np.unique(targets)) == targets.size
        assert valid[i].sum() == min(16, (lengths[i] - 1) // seq_len)
        # windows spread over the stream: the last one starts in its final 1/W + 1 slot share
        if valid[i].sum() == 16:
            assert s[-1] >= lengths[i] - 2 * lengths[i] / 16 - 2 * seq_len


def test_gather_windows_gives_matching_mask_windows():
    ct = stack_streams([np.arange(20)], loss_masks=[np.arange(20) % 2])
    starts, _ = eval_window_starts(ct.lengths, 4, 3)
    m = gather_windows(ct.loss_mask, starts, 5)
    np.testing.assert_array_equal(m[0, :, 0], starts[0] % 2)


def test_eval_windows_short_stream_error_names_client():
    ct = _ct([50, 5])
    with pytest.raises(ValueError, match=r"client 1 \('b'\) has 5 tokens.*smaller seq_len"):
        eval_windows(ct, 8, 4, names=["a", "b"])


def test_reference_windows_evenly_spaced():
    ref = reference_windows(np.arange(1000), 4, 10)
    assert ref.shape == (4, 10) and ref.dtype == np.int32
    np.testing.assert_array_equal(ref[:, 0], [0, 250, 500, 750])
    with pytest.raises(ValueError, match="fewer than 200 x 10"):
        reference_windows(np.arange(1000), 200, 10)


@pytest.mark.parametrize(
    ("vocab_size", "dtype", "itemsize"),
    [(50257, "uint16", 2), (65536, "uint16", 2), (65537, "uint32", 4), (128256, "uint32", 4)],
)
def test_memmap_round_trip(tmp_path, vocab_size, dtype, itemsize):
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, vocab_size, size=1001)
    tokens[0] = vocab_size - 1
    path = write_stream(tmp_path / "s" / "train.bin", tokens, vocab_size)
    assert path.stat().st_size == 1001 * itemsize
    meta = json.loads(sidecar_path(path).read_text())
    assert meta == {"dtype": dtype, "length": 1001, "vocab_size": vocab_size}
    back = open_stream(path)
    assert isinstance(back, np.memmap) and back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back, tokens)
    # raw, headerless: plain np.fromfile reads the same ids
    np.testing.assert_array_equal(np.fromfile(path, dtype=dtype), tokens)


def test_memmap_errors(tmp_path):
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        write_stream(tmp_path / "x.bin", np.array([1, 300]), 256)
    raw = tmp_path / "raw.bin"
    np.arange(4, dtype=np.uint16).tofile(raw)
    with pytest.raises(FileNotFoundError, match="no sidecar"):
        open_stream(raw)
    path = write_stream(tmp_path / "y.bin", np.arange(10), 256)
    path.write_bytes(path.read_bytes()[:6])
    with pytest.raises(ValueError, match="truncated or stale"):
        open_stream(path)
    assert len(open_stream(write_stream(tmp_path / "e.bin", np.zeros(0, int), 10))) == 0


def test_client_tokens_is_a_namedtuple():
    ct = ClientTokens(np.zeros((1, 3), np.int32), np.array([3], np.int32), None)
    tokens, lengths, mask = ct
    assert ct.num_clients == 1 and mask is None


def test_split_tail_holds_out_the_last_fraction_of_each_stream():
    from fedjax_lora.data.streams import split_tail

    streams = [np.arange(100), np.arange(1000, 1040)]
    masks = [np.ones(100, np.uint8), np.zeros(40, np.uint8)]
    head, tail = split_tail(stack_streams(streams, masks), 0.1)
    np.testing.assert_array_equal(head.lengths, [90, 36])
    np.testing.assert_array_equal(tail.lengths, [10, 4])
    np.testing.assert_array_equal(tail.stream(0), np.arange(90, 100))
    np.testing.assert_array_equal(head.stream(1), np.arange(1000, 1036))
    assert tail.loss_mask[0, :10].all() and not tail.loss_mask[1].any()
    with pytest.raises(ValueError, match="fraction"):
        split_tail(stack_streams(streams), 1.0)
