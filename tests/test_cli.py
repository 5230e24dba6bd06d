"""The command line's own surface: --version and bare `appleslm`."""

from __future__ import annotations

import pytest

from appleslm import __version__
from appleslm.cli import main


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
