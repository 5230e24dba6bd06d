"""Packing, the streaming shuffle buffer, exact resume, rank sharding, evaluation batches."""

from __future__ import annotations

import json

import numpy as np
import pytest

from appleslm.data import batches as batches_mod
from appleslm.data.batches import PackedBatches, iter_eval_batches, num_windows
from appleslm.data.corpus import DataError

L = 8


def positions(n_windows: int, extra: int = 3) -> np.ndarray:
    """Tokens whose values are their own positions, so a batch shows where it came from."""
    return np.arange(n_windows * L + 1 + extra, dtype=np.uint32)


def collect(pb: PackedBatches, steps: int) -> list[np.ndarray]:
    return [np.concatenate(pb.next_batch(), axis=1) for _ in range(steps)]


def reference_order(n: int, size: int, seed: int, epoch: int) -> list[int]:
    """The streaming shuffle buffer written the slow, obvious way."""
    rng = np.random.default_rng([seed, epoch])
    size = max(1, min(size, n))
    chunk = batches_mod.CHUNK
    u = np.concatenate([rng.random(min(chunk, n - k)) for k in range(0, n, chunk)])
    buf, nxt, out = list(range(size)), size, []
    for k in range(n):
        j = int(u[k] * len(buf))
        out.append(buf[j])
        if nxt < n:
            buf[j], nxt = nxt, nxt + 1
        else:
            buf[j] = buf[-1]
            buf.pop()
    return out


def test_every_token_is_a_target_exactly_once_per_epoch():
    tokens = positions(24)
    pb = PackedBatches(tokens, batch_size=4, seq_len=L, seed=0, shuffle_buffer=10)
    assert pb.n_windows == 24 == num_windows(len(tokens), L)
    xs, ys = zip(*(pb.next_batch() for _ in range(6)), strict=True)
    x, y = np.concatenate(xs), np.concatenate(ys)
    assert x.dtype == y.dtype == np.int32 and x.shape == (24, L)
    assert np.array_equal(y, x + 1)  # y is x shifted by one token
    assert np.array_equal(np.sort(y.ravel()), np.arange(1, 24 * L + 1))
    assert not np.array_equal(x[:, 0], np.arange(24) * L)  # and the order is shuffled
    assert pb.epoch == 0 and pb.consumed == 24
    pb.next_batch()
    assert (pb.epoch, pb.consumed) == (1, 4)


@pytest.mark.parametrize("n,size", [(50, 7), (12, 12), (9, 1), (40, 100)])
def test_matches_reference_streaming_buffer_across_chunks(monkeypatch, n, size):
    monkeypatch.setattr(batches_mod, "CHUNK", 5)  # exercise the chunked, vectorized path
    pb = PackedBatches(positions(n), batch_size=1, seq_len=L, seed=3, shuffle_buffer=size)
    for epoch in range(2):
        got = [int(pb.next_batch()[0][0, 0]) // L for _ in range(n)]
        assert got == reference_order(n, size, 3, epoch)
        # a streaming buffer cannot emit a window it has not read yet
        assert all(w < min(size, n) + k for k, w in enumerate(got))
    if size == 1:
        assert got == list(range(n))


def test_same_seed_same_batches_different_seed_different():
    tokens = positions(40)
    a = collect(PackedBatches(tokens, 3, L, seed=7, shuffle_buffer=16), 30)
    b = collect(PackedBatches(tokens, 3, L, seed=7, shuffle_buffer=16), 30)
    c = collect(PackedBatches(tokens, 3, L, seed=8, shuffle_buffer=16), 30)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))


@pytest.mark.parametrize("stop", [5, 13, 14, 27])  # mid-epoch, exactly at and across the boundary
def test_resume_from_state_dict_is_exact(monkeypatch, stop):
    monkeypatch.setattr(batches_mod, "CHUNK", 4)  # resume points fall inside and between chunks
    tokens = positions(39)  # 39 windows / batch 3 = 13 batches per epoch
    whole = PackedBatches(tokens, 3, L, seed=1, shuffle_buffer=10)
    expected = collect(whole, stop + 15)

    first = PackedBatches(tokens, 3, L, seed=1, shuffle_buffer=10)
    collect(first, stop)
    state = json.loads(json.dumps(first.state_dict()))  # must survive a checkpoint file
    assert set(state) >= {"epoch", "consumed"} and len(json.dumps(state)) < 300
    resumed = PackedBatches(tokens, 3, L, seed=1, shuffle_buffer=10)
    resumed.load_state_dict(state)
    after = collect(resumed, 15)
    assert all(np.array_equal(p, q) for p, q in zip(after, expected[stop:], strict=True))


def test_resume_rejects_a_changed_stream():
    pb = PackedBatches(positions(20), 2, L, seed=0, shuffle_buffer=5)
    state = pb.state_dict()
    with pytest.raises(DataError, match="n_windows was 20, now 21"):
        PackedBatches(positions(21), 2, L, seed=0, shuffle_buffer=5).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        PackedBatches(positions(20), 2, L, seed=1, shuffle_buffer=5).load_state_dict(state)


def test_two_ranks_together_equal_one_rank_with_double_batch():
    tokens = positions(30)  # 30 windows, global batch 8: batches cross the epoch boundary
    single = PackedBatches(tokens, 8, L, seed=5, shuffle_buffer=12)
    ranks = [
        PackedBatches(tokens, 4, L, seed=5, shuffle_buffer=12, rank=r, world_size=2)
        for r in range(2)
    ]
    for _ in range(10):
        x, y = single.next_batch()
        parts = [rb.next_batch() for rb in ranks]
        assert np.array_equal(np.concatenate([p[0] for p in parts]), x)
        assert np.array_equal(np.concatenate([p[1] for p in parts]), y)
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()


def test_too_short_and_bad_arguments():
    with pytest.raises(DataError, match="too few for one sequence of seq_len \\+ 1 = 9"):
        PackedBatches(np.arange(8), 2, L)
    PackedBatches(np.arange(9), 2, L)  # exactly one window is enough
    with pytest.raises(DataError, match="rank 2"):
        PackedBatches(np.arange(100), 2, L, rank=2, world_size=2)


def test_eval_batches_in_order_deterministic_and_sharded():
    tokens = positions(10)
    batches = list(iter_eval_batches(tokens, 3, L, max_batches=None))
    assert len(batches) == 3  # whole batches only: 9 of 10 windows
    x = np.concatenate([b[0] for b in batches])
    assert np.array_equal(x[:, 0], np.arange(9) * L) and np.array_equal(batches[0][1], x[:3] + 1)
    again = list(iter_eval_batches(tokens, 3, L, max_batches=2))
    assert len(again) == 2 and all(
        np.array_equal(a[0], b[0]) for a, b in zip(again, batches, strict=False)
    )
    sharded = [list(iter_eval_batches(tokens, 2, L, None, rank=r, world_size=2)) for r in range(2)]
    assert len(sharded[0]) == len(sharded[1]) == 2
    joined = np.concatenate([np.concatenate([sharded[0][i][0], sharded[1][i][0]]) for i in (0, 1)])
    single = np.concatenate([b[0] for b in iter_eval_batches(tokens, 4, L, None)])
    assert np.array_equal(joined, single)


def test_eval_batches_small_validation_set():
    small = list(iter_eval_batches(positions(2), 16, L, max_batches=20))
    assert len(small) == 1 and small[0][0].shape == (2, L)
    with pytest.raises(DataError, match="validation tokens are too few"):
        iter_eval_batches(np.arange(5), 4, L)
