"""MLX's float32 matmul through OpenBLAS against numpy's, at the training step's shapes (Linux).

  python scripts/bench_matmul.py                  # 1 and 2 BLAS threads, 3 rounds
  python scripts/bench_matmul.py --threads 1 --rounds 5

Child processes (a preload only takes effect at process start) alternate between:
  mlx         MLX with Debian's libopenblas0-pthread preloaded (what `appleslm` does), the
              environment as it is; only MLX multiplies in that process;
  numpy       numpy alone (its wheel's own OpenBLAS, 0.3.31 here);
  both        MLX and numpy in one process, alternating shape by shape, as a side-by-side
              comparison in one script does: two OpenBLAS thread pools in one process;
  mlx-hsw     MLX with OPENBLAS_CORETYPE=Haswell (AVX2 kernels; what the reference machine's
              environment forces), measured for what it costs;
  mlx-l2      MLX with OPENBLAS_L2_SIZE=512 (the reference environment's other variable);
  mlx-pypi    MLX with the OpenBLAS of the `scipy-openblas32` wheel (pip install
              scipy-openblas32), through scripts/native/scipy_openblas_shim.c built with gcc.
Shapes are the tiny step's (M x N x K as MLX calls sgemm, with its transposes; see
scripts/profile_step.py's matmul table) plus two square ones. GFLOP/s, medians over rounds.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIM_SOURCE = ROOT / "scripts" / "native" / "scipy_openblas_shim.c"

# (M, N, K, transpose A, transpose B) as the tiny step calls cblas_sgemm
SHAPES = [
    (2048, 320, 128, False, True),  # gate/up projection forward: x @ W.T
    (2048, 128, 320, False, False),  # their input gradient: dY @ W
    (320, 128, 2048, True, False),  # their weight gradient: dY.T @ x
    (2048, 128, 128, False, True),  # q / o projection forward
    (256, 128, 32, False, True),  # attention scores, one (batch, kv head): Q @ K.T
    (256, 32, 128, False, False),  # attention output: P @ V
    (2048, 2048, 128, False, True),  # head forward: h @ E.T
    (2048, 128, 2048, False, False),  # head input gradient
    (1024, 1024, 1024, False, False),
    (2048, 2048, 2048, False, False),
]

CHILD = r"""
import ctypes, json, sys, time
import numpy as np
import mlx.core as mx

shapes = json.loads(sys.argv[1])
which = sys.argv[2]  # "mlx", "numpy" or "both"
try:
    lib = ctypes.CDLL(None)
    lib.openblas_get_corename.restype = ctypes.c_char_p
    core = lib.openblas_get_corename().decode()
except AttributeError:
    core = "?"

def best(fn, reps):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]

out = {"core": core, "mlx": [], "numpy": []}
rng = np.random.default_rng(0)
for m, n, k, ta, tb in shapes:
    stored_a = rng.standard_normal((k, m) if ta else (m, k), dtype=np.float32)
    stored_b = rng.standard_normal((n, k) if tb else (k, n), dtype=np.float32)
    a, b = (stored_a.T if ta else stored_a), (stored_b.T if tb else stored_b)
    xa, xb = mx.array(stored_a), mx.array(stored_b)
    xa, xb = (xa.T if ta else xa), (xb.T if tb else xb)
    mx.eval(xa, xb)
    flops = 2.0 * m * n * k
    reps = max(5, min(50, int(2e9 / flops)))
    if which in ("mlx", "both"):
        out["mlx"].append(flops / best(lambda: mx.eval(xa @ xb), reps) / 1e9)
    if which in ("numpy", "both"):
        out["numpy"].append(flops / best(lambda: a @ b, reps) / 1e9)
print(json.dumps(out))
"""


def pypi_shim(build_dir: Path, lib_dir: str | None) -> Path | None:
    """Build the scipy-openblas32 shim, or None when the wheel or gcc is missing."""
    if lib_dir is None:
        try:
            import scipy_openblas32
        except ImportError:
            return None
        lib_dir = scipy_openblas32.get_lib_dir()
    shim = build_dir / "libappleslm_scipy_openblas.so"
    command = ["gcc", "-O2", "-shared", "-fPIC", str(SHIM_SOURCE), "-o", str(shim)]
    command += [f"-L{lib_dir}", "-lscipy_openblas", f"-Wl,-rpath,{lib_dir}"]
    try:
        subprocess.run(command, check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return shim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--scipy-openblas-lib",
        help="the lib directory of a scipy-openblas32 install (default: import it)",
    )
    args = parser.parse_args()
    debian = sorted(glob.glob("/usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0"))
    if not debian:
        raise SystemExit("no Debian OpenBLAS: apt install libopenblas0-pthread")
    with tempfile.TemporaryDirectory() as tmp:
        deb = debian[0]
        variants = {
            "mlx": (deb, {}, "mlx"),
            "numpy": (deb, {}, "numpy"),
            "both": (deb, {}, "both"),
            "mlx-hsw": (deb, {"OPENBLAS_CORETYPE": "Haswell"}, "mlx"),
            "mlx-l2": (deb, {"OPENBLAS_L2_SIZE": "512"}, "mlx"),
        }
        shim = pypi_shim(Path(tmp), args.scipy_openblas_lib)
        if shim:
            variants["mlx-pypi"] = (str(shim), {}, "mlx")
        else:
            print("mlx-pypi: skipped (pip install scipy-openblas32; gcc needed)")
        env_note = {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
        print(f"environment: {env_note}; load {os.getloadavg()[0]:.2f}")
        for threads in args.threads:
            results = {name: [] for name in variants}
            for round_ in range(args.rounds):
                names = list(variants)
                names = names[round_ % len(names) :] + names[: round_ % len(names)]
                for name in names:
                    library, extra, which = variants[name]
                    env = dict(os.environ, LD_PRELOAD=library, OPENBLAS_NUM_THREADS=str(threads))
                    env.update(extra)
                    done = subprocess.run(
                        [sys.executable, "-c", CHILD, json.dumps(SHAPES), which],
                        env=env,
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            cores = {name: results[name][0]["core"] for name in variants}
            print(
                f"\n{threads} BLAS thread(s), {args.rounds} rounds, load now "
                f"{os.getloadavg()[0]:.2f}; cores: {cores}"
            )
            columns = []
            for name in variants:
                kinds = ["mlx", "numpy"] if variants[name][2] == "both" else [variants[name][2]]
                columns += [(name, kind) for kind in kinds]
            header = " | ".join(
                name if name != "both" else f"both: {kind}" for name, kind in columns
            )
            print(f"| M x N x K (trans) | {header} |")
            print("| --- |" + " --- |" * len(columns))
            for i, (m, n, k, ta, tb) in enumerate(SHAPES):
                cells = [
                    statistics.median(r[kind][i] for r in results[name]) for name, kind in columns
                ]
                trans = f"{'T' if ta else 'N'}{'T' if tb else 'N'}"
                print(
                    f"| {m} x {n} x {k} ({trans}) | " + " | ".join(f"{c:.0f}" for c in cells) + " |"
                )


if __name__ == "__main__":
    main()
