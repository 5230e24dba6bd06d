"""Training speed with OpenBLAS preloaded vs the mlx-cpu wheel's reference BLAS (Linux).

  python scripts/bench_blas.py [--preset tiny] [--reps 3] [--steps 5]

`LD_PRELOAD` only takes effect at process start, so each side runs in a child process; the two
alternate and the reported speed-up is the median of paired ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = """
import json, sys, tempfile, time
from pathlib import Path
from appleslm.blas import blas_in_use
from appleslm.config import load_config
from appleslm.train.pretrain import Pretraining
from appleslm.train.trainer import Trainer
cfg = load_config(sys.argv[1])
with tempfile.TemporaryDirectory() as tmp:
    task = Pretraining(cfg, Path(tmp) / "run")
    trainer = Trainer(task, cfg.train, Path(tmp) / "run", progress=False, log=lambda message: None)
    for _ in range(2):
        trainer.train_step(task.step_batch(trainer.step))
    start = time.perf_counter()
    for _ in range(int(sys.argv[2])):
        trainer.train_step(task.step_batch(trainer.step))
    seconds = (time.perf_counter() - start) / int(sys.argv[2])
tokens = cfg.train.batch_size * cfg.train.seq_len
print(json.dumps({"blas": blas_in_use(), "tok_s": tokens / seconds}))
"""


def run(choice: str, preset: str, steps: int) -> dict:
    env = dict(os.environ, APPLESLM_BLAS=choice)
    if choice == "auto":
        from appleslm.blas import find_openblas

        library = find_openblas()
        if library is None:
            raise SystemExit("no OpenBLAS found: apt install libopenblas0-pthread")
        env["LD_PRELOAD"] = library
    done = subprocess.run(
        [sys.executable, "-c", CHILD, preset, str(steps)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    pairs = []
    for _ in range(args.reps):
        fast, slow = run("auto", args.preset, args.steps), run("reference", args.preset, args.steps)
        pairs.append((fast["tok_s"], slow["tok_s"]))
        print(
            f"{fast['blas']}: {fast['tok_s']:.0f} tok/s; {slow['blas']}: {slow['tok_s']:.0f} tok/s"
        )
    ratio = statistics.median(f / s for f, s in pairs)
    print(f"{args.preset}: OpenBLAS trains {ratio:.1f}x faster (median of {args.reps} pairs)")


if __name__ == "__main__":
    main()
