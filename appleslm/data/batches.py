"""Packed training batches with a seeded streaming shuffle buffer, resumable and rank-sharded.

The token array (all documents joined, each ending in `<|endoftext|>`) is cut into windows of
seq_len + 1 tokens at a stride of seq_len: window i covers tokens [i*L, i*L + L], x = w[:-1] and
y = w[1:]. Consecutive windows share one boundary token, so every token after the first is a
target exactly once per epoch (the last < L tokens that do not fill a window are left out).

Order within an epoch comes from a streaming shuffle buffer, as in the Leviathan recipe: the
buffer is filled with the first S windows of the sequential stream, and each step takes a random
slot and refills it from the stream (once the stream is spent, the buffer drains). The draws come
from numpy's Generator seeded with (seed, epoch), always in fixed-size chunks from the start of the
epoch, so the order is a pure function of (seed, epoch, position). That makes the resume state
two integers, and restoring replays only index arithmetic (vectorized), never token reads.

Data parallelism: every rank runs the same stream of global batches of world_size * batch_size
windows and keeps its own rows [rank*B, (rank+1)*B), so W ranks with batch B see exactly the
sequences one process with batch W*B sees.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from appleslm.data.corpus import DataError

STATE_VERSION = 1
CHUNK = 65536  # pops computed per vectorized step; fixed, because replay must draw identically


def num_windows(n_tokens: int, seq_len: int) -> int:
    """How many training windows of seq_len + 1 tokens (stride seq_len) fit in n_tokens."""
    return max(0, (n_tokens - 1) // seq_len)


class PackedBatches:
    """An endless stream of (x, y) int32 batches of shape (batch_size, seq_len) over `tokens`."""

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        shuffle_buffer: int = 10000,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1 or seq_len < 1:
            raise DataError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.n_windows = num_windows(len(tokens), seq_len)
        if self.n_windows < 1:
            raise DataError(
                f"{len(tokens)} training tokens are too few for one sequence of seq_len + 1 = "
                f"{seq_len + 1} tokens; use more text or a shorter seq_len"
            )
        self.buffer_size = max(1, min(shuffle_buffer, self.n_windows))
        self._offsets = np.arange(seq_len + 1, dtype=np.int64)
        self._start_epoch(0)

    # -- the window stream -------------------------------------------------------------------

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.consumed = 0  # windows of this epoch handed out (across all ranks)
        self._rng = np.random.default_rng([self.seed, epoch])
        self._slots = np.arange(self.buffer_size, dtype=np.int64)  # the buffer's contents
        self._generated = 0  # pops computed so far this epoch
        self._pending = np.empty(0, dtype=np.int64)  # computed, not yet handed out

    def _next_chunk(self) -> np.ndarray:
        """The next up-to-CHUNK window indices of this epoch's shuffled order."""
        n, s, k0 = self.n_windows, self.buffer_size, self._generated
        m = min(CHUNK, n - k0)
        k = k0 + np.arange(m, dtype=np.int64)
        # Before pop k the buffer holds min(S, N - k) windows; a float draw scaled by that length
        # keeps the number of draws per pop fixed at one, which the vectorized path relies on.
        j = (self._rng.random(m) * np.minimum(s, n - k)).astype(np.int64)
        out = np.empty(m, dtype=np.int64)
        n_fill = int(np.clip(n - s - k0, 0, m))  # pops that refill their slot from the stream
        if n_fill:
            out[:n_fill] = _refilling_pops(self._slots, s + k0, j[:n_fill])
        for t in range(n_fill, m):  # drain: at most S pops per epoch, so a Python loop is fine
            last = n - (k0 + t) - 1
            out[t] = self._slots[j[t]]
            self._slots[j[t]] = self._slots[last]
        self._generated += m
        return out

    def _take(self, count: int) -> np.ndarray:
        parts = []
        while count:
            if self.consumed == self.n_windows:
                self._start_epoch(self.epoch + 1)
            if not len(self._pending):
                self._pending = self._next_chunk()
            n = min(count, len(self._pending))
            parts.append(self._pending[:n])
            self._pending = self._pending[n:]
            self.consumed += n
            count -= n
        return np.concatenate(parts)

    # -- public ------------------------------------------------------------------------------

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """This rank's (x, y), each int32 (batch_size, seq_len), from the next global batch."""
        windows = self._take(self.world_size * self.batch_size)
        mine = windows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        rows = np.asarray(self.tokens[mine[:, None] * self.seq_len + self._offsets], dtype=np.int32)
        return rows[:, :-1], rows[:, 1:]

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """A small JSON-serializable position; the rest is recomputed by `load_state_dict`.

        The position counts global windows, so a resumed run may even change batch size or
        world size and still continue the same sequence stream.
        """
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "n_windows": self.n_windows,
            "shuffle_buffer": self.buffer_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("version", "seed", "seq_len", "n_windows", "shuffle_buffer"):
            if state.get(key) != mine[key]:
                raise DataError(
                    f"cannot resume the data stream exactly: {key} was {state.get(key)!r}, "
                    f"now {mine[key]!r} (did the corpus, tokenizer or data config change?)"
                )
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        if epoch < 0 or not 0 <= consumed <= self.n_windows:
            raise DataError(f"invalid data stream state: epoch {epoch}, consumed {consumed}")
        self._start_epoch(epoch)
        while self._generated < consumed:  # replay the index draws; no tokens are read
            self._pending = self._next_chunk()
        self._pending = self._pending[len(self._pending) - (self._generated - consumed) :]
        self.consumed = consumed


def _refilling_pops(slots: np.ndarray, base: int, j: np.ndarray) -> np.ndarray:
    """Pops from a full buffer where pop t takes slot j[t] and refills it with window base + t.

    Vectorized: a pop returns what the previous pop of the same slot (in this chunk) put there,
    or the slot's content at the start of the chunk if it is the slot's first pop. `slots` is
    updated in place to what each slot holds after the chunk.
    """
    m = len(j)
    order = np.argsort(j, kind="stable")  # by slot, then by time
    js = j[order]
    first = np.ones(m, dtype=bool)
    first[1:] = js[1:] != js[:-1]
    previous = np.empty(m, dtype=np.int64)
    previous[0] = 0
    previous[1:] = order[:-1]
    out = np.empty(m, dtype=np.int64)
    out[order] = np.where(first, slots[js], base + previous)
    last = np.ones(m, dtype=bool)
    last[:-1] = js[1:] != js[:-1]
    slots[js[last]] = base + order[last]
    return out


def eval_batch_count(
    n_tokens: int, batch_size: int, seq_len: int, max_batches: int | None, world_size: int = 1
) -> tuple[int, int]:
    """(windows per rank and batch, batches) that `iter_eval_batches` yields for `n_tokens`."""
    n = num_windows(n_tokens, seq_len)
    per_rank = min(batch_size, n // world_size)
    if per_rank < 1:
        raise DataError(
            f"{n_tokens} validation tokens are too few for one sequence of seq_len + 1 = "
            f"{seq_len + 1} tokens per rank; raise data.val_fraction or lower seq_len"
        )
    n_batches = n // (per_rank * world_size)
    if max_batches is not None and max_batches > 0:
        n_batches = min(n_batches, max_batches)
    return per_rank, n_batches


def iter_eval_batches(
    tokens: np.ndarray,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Validation batches: windows in order, the same every call, sharded like training.

    Only whole global batches are yielded, so every rank runs the same number of steps (a rank
    that ran one more would hang the others in the gradient/loss all-reduce). A validation set
    smaller than one global batch is used as one smaller batch.
    """
    per_rank, n_batches = eval_batch_count(
        len(tokens), batch_size, seq_len, max_batches, world_size
    )
    offsets = np.arange(seq_len + 1, dtype=np.int64)
    return _eval_batches(tokens, per_rank, seq_len, n_batches, rank, world_size, offsets)


def _eval_batches(
    tokens: np.ndarray,
    per_rank: int,
    seq_len: int,
    n_batches: int,
    rank: int,
    world_size: int,
    offsets: np.ndarray,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for b in range(n_batches):
        first = (b * world_size + rank) * per_rank
        starts = np.arange(first, first + per_rank, dtype=np.int64) * seq_len
        rows = np.asarray(tokens[starts[:, None] + offsets], dtype=np.int32)
        yield rows[:, :-1], rows[:, 1:]
