"""The package as a user installs it: a wheel (not editable) in a fresh virtual environment, run
from an empty folder, finds its presets, its bundled corpus and its chat app.

The fresh environment reuses the installed dependencies through a .pth file (no network), but
appleslm itself comes only from the wheel.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{cmd}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    run([*pip, str(ROOT), "-w", str(out)], cwd=out)
    (found,) = out.glob("appleslm-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheel) -> Path:
    root = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", str(root / "env")], cwd=root)
    python = root / "env" / "bin" / "python"
    site = run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root
    )
    deps = sysconfig.get_paths()["purelib"]  # this environment's dependencies, reused
    (Path(site.stdout.strip()) / "appleslm-deps.pth").write_text(deps + "\n")
    run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], root)
    return root / "env"


def test_the_wheel_ships_presets_and_the_app_under_project_names(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "appleslm/configs/tiny.yaml" in names
    assert "appleslm/configs/sweeps/density.yaml" in names
    assert "appleslm/data/corpora/sotu.jsonl.xz" in names
    assert "appleslm_tui/chat.tcss" in names
    tops = {name.split("/")[0] for name in names}
    assert tops == {"appleslm", "appleslm_tui", *(t for t in tops if t.endswith(".dist-info"))}


def test_the_installed_wheel_trains_and_chats_from_an_empty_folder(venv, tmp_path):
    env = {"HOME": str(tmp_path / "home"), "PATH": f"{venv / 'bin'}:/usr/bin:/bin"}
    empty = tmp_path / "empty"
    empty.mkdir()
    where = run(
        [str(venv / "bin" / "python"), "-c", "import appleslm; print(appleslm.__file__)"],
        empty,
        env=env,
    )
    assert where.stdout.startswith(str(venv))  # the wheel's copy, not the source tree
    appleslm = str(venv / "bin" / "appleslm")
    info = run([appleslm, "info", "tiny", "--json"], empty, env=env)
    assert '"params_total": 1296000' in info.stdout
    run([appleslm, "train", "tiny", "--steps", "3", "--out", "x", "--no-progress"], empty, env=env)
    assert (empty / "x" / "model" / "model.safetensors").is_file()
    assert "usage: appleslm chat" in run([appleslm, "chat", "--help"], empty, env=env).stdout
