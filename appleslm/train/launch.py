"""Both cores: a training command run again as N local data-parallel processes.

MLX's CPU backend is single-threaded outside BLAS, and one OpenBLAS thread per step is as fast as
two here (docs/benchmarks.md), so one process leaves every other core idle. On a CPU-only machine
`train` and `sft` therefore start one process per core over MLX's own ring backend on loopback
(what `mlx.launch --backend ring -n N` does), each with one BLAS thread; the trainer splits every
global batch between them, so losses and weights are those of one process with the same batch.
On a Mac's GPU one process already has the whole device: one process there.

This process becomes the launcher: it forwards Ctrl-C / SIGTERM to the ranks once each (they
stop together at a step boundary), and the first rank that fails ends the run with its message.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlx.core as mx

from appleslm.errors import AppleslmError

RANK_VARIABLE = "MLX_RANK"  # set by mlx.launch and by this launcher: this process is one rank
PEER_LOST = 3  # a rank's exit status when another rank went away: the cause is elsewhere
RING_NOISE = b"[ring]"  # what MLX's ring backend prints, from C++, when a peer goes away


def lost_a_peer(error: Exception) -> bool:
    """Whether a rank's error is the ring backend losing another rank (the launcher reports it)."""
    return is_rank() and isinstance(error, RuntimeError) and RING_NOISE.decode() in str(error)


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def is_rank() -> bool:
    """Whether this process is already one rank of a launch (ours, mlx.launch's or MPI's)."""
    return RANK_VARIABLE in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ


def data_parallel_procs(requested: int | None, batch_size: int, grad_accum: int) -> int:
    """How many local processes to train with: `requested`, or by default one per core on the
    CPU (the most that divide the batch into equal shares) and one on a GPU; 1 inside a rank."""
    if is_rank():  # already one of a launch's ranks (which reran the command with its flags)
        return 1
    per_rank_unit = batch_size // grad_accum  # sequences of one micro-batch over every rank
    if requested is not None:
        if requested < 1:
            raise AppleslmError(f"--procs must be at least 1, got {requested}")
        if per_rank_unit % requested:
            raise AppleslmError(
                f"--procs {requested} does not divide the batch: batch_size {batch_size} must "
                f"be a multiple of procs x grad_accum = {requested} x {grad_accum}; "
                "choose another --procs or batch size"
            )
        return requested
    if mx.default_device() == mx.gpu:
        return 1
    return max(n for n in range(1, cores() + 1) if per_rank_unit % n == 0)


def run_local_ranks(procs: int, argv: list[str]) -> int:
    """`python -m appleslm ARGV` as `procs` ranks on loopback; returns the exit status: 0 when
    every rank finished, else the failing rank's (its message printed)."""
    with tempfile.TemporaryDirectory(prefix="appleslm-ranks-") as scratch:
        hostfile = Path(scratch) / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in free_ports(procs)]))
        ranks = [start_rank(rank, argv, hostfile, Path(scratch)) for rank in range(procs)]
        muted = threading.Event()
        relay = threading.Thread(target=relay_stderr, args=(ranks[0], muted), daemon=True)
        relay.start()
        with forwarded_signals(ranks):
            status = wait_for(ranks, Path(scratch), muted)
        relay.join(timeout=5)
        return status


def relay_stderr(rank0: subprocess.Popen, muted: threading.Event) -> None:
    """Rank 0's progress and messages, live; once a peer is gone the rest is the crash's noise."""
    fd = rank0.stderr.fileno()
    while chunk := os.read(fd, 4096):
        if RING_NOISE in chunk:
            muted.set()
        if not muted.is_set():
            sys.stderr.buffer.write(chunk)
            sys.stderr.buffer.flush()


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def start_rank(rank: int, argv: list[str], hostfile: Path, scratch: Path) -> subprocess.Popen:
    env = dict(os.environ, MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfile))
    env.setdefault("OPENBLAS_NUM_THREADS", "1")  # two pools on two cores wait for each other
    # Rank 0 speaks for the run; the others' output is kept in case one of them fails.
    quiet = None if rank == 0 else (scratch / f"rank{rank}.log").open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "appleslm", *argv],
        env=env,
        stdout=subprocess.DEVNULL if quiet else None,
        stderr=quiet or subprocess.PIPE,
        # Own process group: a terminal's Ctrl-C reaches the launcher only, which forwards it
        # once (a rank that saw it twice would stop without its checkpoint).
        start_new_session=True,
        preexec_fn=die_with_parent,
    )


def die_with_parent() -> None:
    """In the child: a launcher killed with -9 takes its ranks along (Linux's PR_SET_PDEATHSIG);
    elsewhere a rank that outlives it fails at its next collective."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


class forwarded_signals:
    def __init__(self, ranks: list[subprocess.Popen]):
        self.ranks, self.previous = ranks, {}

    def __enter__(self) -> forwarded_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.forward)
        return self

    def forward(self, signum, frame) -> None:
        for process in self.ranks:
            if process.poll() is None:
                process.send_signal(signum)

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        for process in self.ranks:  # only a failure or an exception leaves ranks running
            if process.poll() is None:
                process.kill()
                process.wait()


def wait_for(ranks: list[subprocess.Popen], scratch: Path, muted: threading.Event) -> int:
    peer_lost_since = None
    while True:
        codes = [process.poll() for process in ranks]
        causes = [(r, code) for r, code in enumerate(codes) if code not in (None, 0, PEER_LOST)]
        if causes:
            muted.set()
            report_failure(*causes[0], scratch)
            return causes[0][1] if causes[0][1] > 0 else 1
        if PEER_LOST in codes:  # the rank that caused it is about to be seen exiting
            peer_lost_since = peer_lost_since or time.monotonic()
            if time.monotonic() - peer_lost_since > 10:
                print("appleslm: data-parallel ranks lost each other; run stopped", file=sys.stderr)
                return 1
        elif all(code == 0 for code in codes):
            return 0
        time.sleep(0.1)


def report_failure(rank: int, code: int, scratch: Path) -> None:
    if rank > 0:  # rank 0 printed its own message
        said = (scratch / f"rank{rank}.log").read_text(errors="replace").strip()
        if said:
            print(said, file=sys.stderr)
    if code == 2:  # a message for the user (bad input), said already
        return
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
    print(
        f"appleslm: data-parallel rank {rank} {how}; the run stopped (its checkpoints are "
        "intact: continue with --resume, or train in one process with --procs 1)",
        file=sys.stderr,
    )
