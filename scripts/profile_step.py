"""Where a training step's time goes, by op family, with the plain ops and with appleslm's kernels.

  python scripts/profile_step.py                 # tiny preset: table of shares, both paths
  python scripts/profile_step.py --reps 9        # more rounds
  python scripts/profile_step.py --exactness     # 50 steps of tiny: losses, plain vs kernels

Two steps are compared: "plain", the ops of commit 4e7e996 (mx.fast attention, nn.silu,
nn.losses.cross_entropy over the full logits), and "kernels" (appleslm/models/kernels.py and the
fused head + cross-entropy of appleslm/train/losses.py). Shares are measured inside the real
compiled step, not from isolated ops:
  - matmuls: every cblas_sgemm call is timed by a preloaded shim (scripts/native/sgemm_timer.c,
    built with gcc on first use), so their share is exact wall time on MLX's compute thread;
  - attention softmax, SwiGLU activation, cross-entropy: the step is rebuilt with that op replaced
    by a cheap stand-in of the same shapes (the matmuls around it kept), and its share is the time
    that saves;
  - other: the rest (norms, RoPE, residuals, embedding, copies, optimizer, framework).
All variants run round-robin in one process (this machine drifts 20-30%); medians. Times are
the process's CPU time with one OpenBLAS thread (default): on a shared 2-core machine that is
the work a step costs, much less sensitive to the other jobs than wall time, which is printed
too.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from appleslm.blas import blas_in_use, find_openblas, reexec_with_openblas  # noqa: E402

TIMER_SOURCE = ROOT / "scripts" / "native" / "sgemm_timer.c"
TIMER_LIBRARY = Path(tempfile.gettempdir()) / "appleslm-sgemm-timer.so"


def preload_sgemm_timer() -> None:
    """Re-exec once with the sgemm timer preloaded in front of OpenBLAS (Linux, gcc needed)."""
    if os.environ.get("_APPLESLM_SGEMM_TIMER") or not sys.platform.startswith("linux"):
        return
    library = find_openblas()
    if library is None:
        return
    try:
        subprocess.run(
            ["gcc", "-O2", "-shared", "-fPIC", str(TIMER_SOURCE), "-o", str(TIMER_LIBRARY), "-ldl"],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return  # no compiler: no matmul column
    preload = ":".join(filter(None, [str(TIMER_LIBRARY), library, os.environ.get("LD_PRELOAD")]))
    env = dict(os.environ, LD_PRELOAD=preload, _APPLESLM_SGEMM_TIMER="1")
    env["_APPLESLM_BLAS_REEXECUTED"] = "1"
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


if "--exactness" not in sys.argv:
    preload_sgemm_timer()
reexec_with_openblas([sys.executable, *sys.argv])

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402

from appleslm.config import load_config  # noqa: E402
from appleslm.models import Model, kernels  # noqa: E402
from appleslm.models import appleslm as architecture  # noqa: E402
from appleslm.train.losses import linear_head, token_loss_sums  # noqa: E402
from appleslm.train.optim import build_optimizer  # noqa: E402


class SgemmTimer:
    """Reads the preloaded shim's per-shape counters (None when it is not loaded)."""

    def __init__(self):
        try:
            self.lib = ctypes.CDLL(None)
            self.lib.sgemm_timer_count.restype = ctypes.c_int
        except AttributeError:
            self.lib = None

    def reset(self) -> None:
        if self.lib:
            self.lib.sgemm_timer_reset()

    def entries(self) -> list[tuple[int, ...]]:
        """(m, n, k, trans_a, trans_b, calls, wall ns, CPU ns) per distinct call shape."""
        if not self.lib:
            return []
        out = (ctypes.c_longlong * 8)()
        rows = []
        for i in range(self.lib.sgemm_timer_count()):
            self.lib.sgemm_timer_entry(i, out)
            rows.append(tuple(out))
        return rows


def plain_loss(model, x, y):
    """The loss of commit 4e7e996's trainer: cross-entropy over the full float32 logits."""
    return nn.losses.cross_entropy(model(x).astype(mx.float32), y, reduction="mean")


def fused_loss(model, x, y):
    """The same loss through the fused, chunked head + cross-entropy."""
    h, _ = model.hidden_states(x)
    total, count = token_loss_sums(h, linear_head(model).weight, y)
    return total / count


def linear_loss(model, x, y):
    """Stand-in for the cross-entropy: linear in the logits, so the head matmuls stay."""
    return (model(x).astype(mx.float32) * 1e-3).mean()


def attention_stand_in(q, k, v, *, cache, scale, mask):
    """Stand-in for the attention core: the same two matmuls, no mask and no softmax."""
    B, H, L, D = q.shape
    groups = k.shape[1]
    scores = (q * scale).reshape(B, groups, -1, D) @ k.swapaxes(-1, -2)
    return ((scores * 0.01) @ v).reshape(B, H, L, D)


def swiglu_stand_in(gate, up):
    return gate * up


@contextlib.contextmanager
def hooks(**replacements):
    """Install stand-ins in the architecture's kernel table while a step is traced."""
    saved = dict(architecture.KERNELS)
    architecture.KERNELS.update(replacements)
    try:
        yield
    finally:
        architecture.KERNELS.clear()
        architecture.KERNELS.update(saved)


def make_step(cfg, loss, use_kernels: bool, x, y, seed: int = 0, **stand_ins):
    """A compiled AdamW step as the trainer builds it (clipping, the project's optimizer)."""
    mx.random.seed(seed)
    model = Model(cfg.model)
    optimizer = build_optimizer(cfg.train)
    optimizer.init(model.trainable_parameters())
    mx.eval(model.parameters(), optimizer.state)
    loss_and_grad = nn.value_and_grad(model, loss)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x, y):
        value, grads = loss_and_grad(model, x, y)
        grads, _ = optim.clip_grad_norm(grads, cfg.train.grad_clip)
        optimizer.update(model, grads)
        return value

    def run(x=x, y=y):
        value = step(x, y)
        mx.eval(value, state)
        return value

    with kernels.forced(use_kernels), hooks(**stand_ins):  # the choice is made at trace time
        run()
    return run


def model_flops(cfg, tokens: int) -> float:
    """Training FLOPs of one step: 6 x matmul parameters x tokens + causal attention (x3)."""
    m = cfg.model
    head_dim = m.hidden_size // m.num_attention_heads
    per_block = m.hidden_size * head_dim * (2 * m.num_attention_heads + 2 * m.num_key_value_heads)
    per_block += 3 * m.hidden_size * m.intermediate_size
    layers = m.num_hidden_layers * m.layer_repeat
    linear = layers * per_block + m.vocab_size * m.hidden_size
    # QK^T and PV over the full L x L square, as MLX computes them (the mask is applied after)
    attention = layers * 2 * 2 * m.num_attention_heads * head_dim * cfg.train.seq_len * tokens
    return 6 * linear * tokens + 3 * attention


def set_blas_threads(threads: int) -> None:
    try:
        ctypes.CDLL(None).openblas_set_num_threads(threads)
    except AttributeError:
        pass


def profile(args) -> None:
    cfg = load_config(args.preset)
    batch, seq = cfg.train.batch_size, cfg.train.seq_len
    tokens = batch * seq
    set_blas_threads(args.threads)
    rng = np.random.default_rng(0)
    x = mx.array(rng.integers(0, cfg.model.vocab_size, (batch, seq)))
    y = mx.array(rng.integers(0, cfg.model.vocab_size, (batch, seq)))
    timer = SgemmTimer()
    sides = {"plain": (plain_loss, False), "kernels": (fused_loss, True)}
    ablations = {
        "attention softmax (+ mask)": dict(attention=attention_stand_in),
        "SwiGLU activation": dict(swiglu=swiglu_stand_in),
        "cross-entropy (softmax over the vocabulary)": dict(loss=linear_loss),
    }
    runs = {}
    for side, (loss, on) in sides.items():
        runs[side, "full"] = make_step(cfg, loss, on, x, y)
        for name, replaced in ablations.items():
            replaced = dict(replaced)
            ablated_loss = replaced.pop("loss", loss)
            runs[side, name] = make_step(cfg, ablated_loss, on, x, y, **replaced)
    for _ in range(2):
        for run in runs.values():
            run()
    wall = {key: [] for key in runs}
    cpu = {key: [] for key in runs}
    blas = {side: [] for side in sides}
    shapes = {side: {} for side in sides}
    for _ in range(args.reps):
        for key, run in runs.items():
            timer.reset()
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            cpu[key].append(time.process_time() - start_cpu)
            wall[key].append(time.perf_counter() - start)
            if key[1] == "full" and timer.lib:
                rows = timer.entries()
                blas[key[0]].append(sum(r[7] for r in rows) / 1e9)
                for m, n, k, ta, tb, calls, _, cpu_ns in rows:
                    shapes[key[0]].setdefault((m, n, k, ta, tb, calls), []).append(cpu_ns)

    def paired(samples):
        return statistics.median(
            a / b for a, b in zip(samples["plain", "full"], samples["kernels", "full"])
        )

    full = {side: statistics.median(cpu[side, "full"]) for side in sides}
    full_wall = {side: statistics.median(wall[side, "full"]) for side in sides}
    print(
        f"BLAS: {blas_in_use()}, {args.threads} thread(s); preset {args.preset}: batch {batch} x "
        f"{seq}; {args.reps} rounds of {len(runs)} steps, round-robin"
    )
    print(f"load average before/after: {args.load} / {os.getloadavg()[0]:.2f}")
    print(
        f"whole step, wall: plain {full_wall['plain'] * 1e3:.0f} ms "
        f"({tokens / full_wall['plain']:.0f} tok/s), kernels {full_wall['kernels'] * 1e3:.0f} ms "
        f"({tokens / full_wall['kernels']:.0f} tok/s); speed-up {paired(wall):.2f}x"
    )
    print(
        f"whole step, CPU time: plain {full['plain'] * 1e3:.0f} ms, kernels "
        f"{full['kernels'] * 1e3:.0f} ms; speed-up {paired(cpu):.2f}x (medians of paired ratios)"
    )
    print()
    print("CPU time per step by op family (forward + backward, inside the compiled step):")
    print()
    print("| op family | plain ms | share | kernels ms | share |")
    print("| --- | --- | --- | --- | --- |")
    rows, accounted = [], {side: 0.0 for side in sides}
    if timer.lib:
        ms = {side: statistics.median(blas[side]) for side in sides}
        rows.append(("matmuls (cblas_sgemm: blocks, attention, head)", ms))
    for name in ablations:
        ms = {
            side: statistics.median(a - b for a, b in zip(cpu[side, "full"], cpu[side, name]))
            for side in sides
        }
        rows.append((name, ms))
    for _, ms in rows:
        for side in sides:
            accounted[side] += ms[side]
    rows.append(
        (
            "other (norms, RoPE, residuals, embedding, copies, optimizer, framework)",
            {side: full[side] - accounted[side] for side in sides},
        )
    )
    rows.append(("whole step", full))
    for name, ms in rows:
        print(
            f"| {name} | {ms['plain'] * 1e3:.0f} | {ms['plain'] / full['plain']:.0%} | "
            f"{ms['kernels'] * 1e3:.0f} | {ms['kernels'] / full['kernels']:.0%} |"
        )
    flops = model_flops(cfg, tokens)
    print()
    print(
        f"model FLOPs per step {flops / 1e9:.1f} G: plain {flops / full['plain'] / 1e9:.1f} "
        f"GFLOP/s, kernels {flops / full['kernels'] / 1e9:.1f} GFLOP/s (per CPU second)"
    )
    if timer.lib:
        print()
        print("matmul calls of one kernels step (median CPU time per shape):")
        print()
        print("| M x N x K | trans A, B | calls | ms | GFLOP/s |")
        print("| --- | --- | --- | --- | --- |")
        total_flops = 0.0
        for (m, n, k, ta, tb, calls), ns in sorted(
            shapes["kernels"].items(), key=lambda item: -statistics.median(item[1])
        ):
            sec = statistics.median(ns) / 1e9
            f = 2.0 * m * n * k * calls
            total_flops += f
            trans = f"{'T' if ta == 112 else 'N'}{'T' if tb == 112 else 'N'}"
            print(
                f"| {m} x {n} x {k} | {trans} | {calls} | {sec * 1e3:.1f} | {f / sec / 1e9:.0f} |"
            )
        sec = statistics.median(blas["kernels"])
        print(
            f"all matmuls: {total_flops / 1e9:.1f} GFLOP in {sec * 1e3:.0f} ms = "
            f"{total_flops / sec / 1e9:.0f} GFLOP/s"
        )


def exactness(args) -> None:
    """Train `steps` steps of the preset twice, plain and with the kernels, from one init on the
    same batches of the preset's own data (the bundled corpus for tiny): the loss curves."""
    from appleslm.data import prepare_data
    from appleslm.data.batches import PackedBatches

    cfg = load_config(args.preset)
    batch, seq = cfg.train.batch_size, cfg.train.seq_len
    data = prepare_data(cfg.data, cfg.model.vocab_size, progress=False)
    batches = PackedBatches(data.train, batch, seq, seed=cfg.train.seed)
    windows = [batches.next_batch() for _ in range(args.steps + 1)]
    x0, y0 = (mx.array(a) for a in windows[0])
    # make_step traces (runs) one step on the first batch; both sides do, so they stay in step
    runs = {
        "plain": make_step(cfg, plain_loss, False, x0, y0),
        "kernels": make_step(cfg, fused_loss, True, x0, y0),
    }
    losses = {k: [] for k in runs}
    for x, y in windows[1:]:
        x, y = mx.array(x), mx.array(y)
        for k, run in runs.items():
            losses[k].append(run(x, y).item())
    diffs = [abs(a - b) for a, b in zip(losses["plain"], losses["kernels"])]
    print(f"{args.steps} steps of {args.preset} on its data, same init and batches:")
    for k in runs:
        print(f"  {k:8s} losses {losses[k][0]:.6f} -> {losses[k][-1]:.6f}")
    worst = max(diffs)
    print(f"  max |loss difference| over the run: {worst:.2e} (step {diffs.index(worst) + 2})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="OpenBLAS threads (1: CPU time is the work done)"
    )
    parser.add_argument("--exactness", action="store_true")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    args.load = f"{os.getloadavg()[0]:.2f}"
    exactness(args) if args.exactness else profile(args)


if __name__ == "__main__":
    main()
