"""Copy finished runs' results (not their weights) into the repository, to outlive the machine.

  python scripts/export_runs.py runs/density-study/* --to docs/density-study

Each finished run RUN becomes TO/RUN/ with `model/appleslm.json` (parameter counts, validation loss,
bits per byte, provenance), `metrics.jsonl` (the loss curve) and `config.yaml`: enough for
`appleslm density TO/*` to re-fit without the weights. Unfinished runs are skipped and named.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

FILES = ("model/appleslm.json", "metrics.jsonl", "config.yaml")


def export(run: Path, to: Path) -> bool:
    if not (run / FILES[0]).is_file():
        return False
    for name in FILES:
        target = to / run.name / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run / name, target)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--to", type=Path, required=True, help="folder to copy the results into")
    args = parser.parse_args()
    runs = [run for run in args.runs if run.is_dir()]
    skipped = [run.name for run in runs if not export(run, args.to)]
    print(f"exported {len(runs) - len(skipped)} runs to {args.to}")
    if skipped:
        print(f"not finished, skipped: {', '.join(skipped)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
