"""The command line's own surface: --version, bare `appleslm`, and next-step hints that work as
typed from the shell the user is in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from appleslm import __version__, cli
from appleslm.cli import hint, main


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"appleslm {__version__}"


def test_bare_command_prints_the_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: appleslm")
    for command in ("train", "chat", "import-gguf", "push"):
        assert command in out


@pytest.fixture
def venv(tmp_path, monkeypatch) -> Path:
    """A venv that is not activated: its python runs us, its bin/ is not on PATH."""
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").touch()
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.chdir(tmp_path)
    return bin_dir


def test_hint_names_the_venv_script_when_not_on_path(venv, monkeypatch):
    (venv / "appleslm").touch()
    monkeypatch.setattr(cli.shutil, "which", lambda name: None)
    assert hint("chat", Path("runs/my run/model")) == ".venv/bin/appleslm chat 'runs/my run/model'"
    other = venv.parent.parent / "elsewhere" / "appleslm"  # another install first on PATH
    monkeypatch.setattr(cli.shutil, "which", lambda name: str(other))
    assert hint("chat", "m") == ".venv/bin/appleslm chat m"


def test_hint_is_plain_when_this_install_is_on_path(venv, monkeypatch):
    (venv / "appleslm").touch()
    monkeypatch.setattr(cli.shutil, "which", lambda name: str(venv / "appleslm"))
    assert hint("generate", "m", "--prompt", "The") == "appleslm generate m --prompt The"


def test_hint_falls_back_to_python_m(venv, monkeypatch):
    monkeypatch.setattr(cli.shutil, "which", lambda name: None)  # no script: a source checkout
    assert hint("density", "a", "b") == ".venv/bin/python -m appleslm density a b"


def test_a_reader_that_stops_early_gets_no_traceback():
    read, write = os.pipe()
    os.close(read)  # like `| head` once it has its lines
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run(
        [sys.executable, "-m", "appleslm", "info", "tiny"],
        env=buffered,  # the output then meets the closed pipe when it is flushed
        stdout=write,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
    )
    os.close(write)
    assert done.returncode == 141 and "Traceback" not in done.stderr, done.stderr
