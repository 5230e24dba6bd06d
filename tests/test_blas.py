"""The BLAS switch: OpenBLAS preloaded by default on Linux, and runs say which BLAS they use."""

import os
import subprocess
import sys

import pytest

from appleslm.blas import find_openblas

REPORT = "from appleslm.blas import blas_in_use; print(blas_in_use({verbose}))"


def run(env_choice: str | None, verbose: bool = False) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APPLESLM_BLAS", "_APPLESLM"))}
    env.pop("LD_PRELOAD", None)
    if env_choice is not None:
        env["APPLESLM_BLAS"] = env_choice
    # The re-exec happens in the CLI's main(); emulate it on a tiny script via the same function.
    report = REPORT.format(verbose=verbose)
    code = (
        "import sys; from appleslm.blas import reexec_with_openblas; "
        f"reexec_with_openblas([sys.executable, '-c', {report!r}]); exec({report!r})"
    )
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or find_openblas() is None,
    reason="needs Linux with OpenBLAS installed",
)
def test_openblas_is_preloaded_by_default_and_can_be_turned_off():
    assert run(None).strip() == "OpenBLAS"  # no library paths in every run's log
    assert run(None, verbose=True).startswith("OpenBLAS (/")  # where it came from, on request
    assert run("reference").startswith("reference BLAS")
