"""Hub push and resolve against a real HTTP server on 127.0.0.1 (tests/hub_server.py).

Nothing here can reach huggingface.co: the client's cache, token and endpoint point into
tmp_path and the loopback server, and connections leaving the machine are refused.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from appleslm.io.card import MARKER, render_model_card, write_model_card
from appleslm.io.hub import HubError
from appleslm.io.model_dir import ModelDirError, load_model, resolve_model
from appleslm.io.push import push_model
from tests.helpers import tree_hashes
from tests.hub_server import HubServer, free_port, isolate_hub_client

FAKE_TOKEN = "hf_FAKEtokenDoNotLeak0123456789"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with HubServer() as server:
        isolate_hub_client(monkeypatch, tmp_path / "hf", endpoint=server.url)
        yield server


@pytest.fixture
def auth_hub(monkeypatch, tmp_path):
    """A Hub that only answers requests carrying FAKE_TOKEN."""
    with HubServer(token=FAKE_TOKEN) as server:
        isolate_hub_client(monkeypatch, tmp_path / "hf", endpoint=server.url)
        yield server


def greedy_tokens(model_spec, n: int = 10) -> list[int]:
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = load_model(model_spec)
    return [
        r.token
        for r in stream_generate(
            model, tokenizer, "The Congress shall", max_tokens=n, sampler=make_sampler(temp=0.0)
        )
    ]


def error_chain(e: BaseException | None) -> str:
    text = []
    while e is not None:
        text.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    return "\n".join(text)


def test_push_download_load_gives_identical_greedy_tokens(hub, tiny_model_dir, tmp_path):
    before = tree_hashes(tiny_model_dir)
    result = push_model(tiny_model_dir, "me/tiny")
    assert result.url == f"{hub.url}/me/tiny" and not result.dry_run and result.commit
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "appleslm_arch.py",
        "README.md",
    } <= set(result.files)
    assert set(hub.repos["me/tiny"].files) == set(result.files)
    assert tree_hashes(tiny_model_dir) == before  # the card went up, the local dir is untouched

    snapshot = resolve_model("me/tiny")
    assert snapshot.is_relative_to(tmp_path / "hf" / "hub")  # downloaded into the test's cache
    card = ModelCard.load(snapshot / "README.md")
    assert card.data.library_name == "mlx" and "appleslm" in card.data.tags
    assert 'load("me/tiny", trust_remote_code=True)' in card.text
    local = greedy_tokens(tiny_model_dir)
    assert len(local) == 10 and greedy_tokens("me/tiny") == local

    again = push_model(tiny_model_dir, "me/tiny")  # the repo exists: fine, and nothing changed
    assert again.commit == result.commit


def test_dry_run_touches_no_network(hub, tiny_model_dir):
    result = push_model(tiny_model_dir, "me/tiny", dry_run=True, private=True)
    assert hub.requests == [] and hub.repos == {}
    assert result.dry_run and result.commit is None and "README.md" in result.files
    assert "library_name: mlx" in result.card and "appleslm chat me/tiny" in result.card
    weights = tiny_model_dir / "model.safetensors"
    assert result.sizes["model.safetensors"] == weights.stat().st_size


def test_a_broken_dir_or_repo_id_fails_before_any_request(hub, tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(ModelDirError, match="weights"):
        push_model(broken, "me/broken")
    with pytest.raises(HubError, match="namespace/name"):
        push_model(tiny_model_dir, "no-namespace")
    assert hub.requests == []


@pytest.fixture
def all_logs(caplog):
    """caplog, also fed by huggingface_hub's logger (which does not propagate to the root)."""
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.addHandler(caplog.handler)
    hub_logger.setLevel(logging.DEBUG)
    caplog.set_level(logging.DEBUG)
    yield caplog
    hub_logger.removeHandler(caplog.handler)
    hub_logger.setLevel(level)


@pytest.mark.parametrize("server_token", [FAKE_TOKEN, "hf_other"], ids=["accepted", "rejected"])
@pytest.mark.parametrize("via", ["argument", "environment"])
def test_the_token_is_never_shown_and_a_rejected_one_is_a_clear_error(
    via, server_token, monkeypatch, tmp_path, tiny_model_dir, all_logs, capfd
):
    with HubServer(token=server_token) as server:
        isolate_hub_client(monkeypatch, tmp_path / "hf", endpoint=server.url)
        if via == "environment":
            monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
        token = FAKE_TOKEN if via == "argument" else None
        error = None
        if server_token == FAKE_TOKEN:
            assert push_model(tiny_model_dir, "me/tiny", token=token).commit
        else:
            with pytest.raises(HubError, match="hf auth login") as info:
                push_model(tiny_model_dir, "me/tiny", token=token)
            error = info.value
            assert "401" in str(error) and "rejected the credentials" in str(error)
        assert server.requests  # the token did travel, to the server only
    out, err = capfd.readouterr()
    for text in (
        error_chain(error),
        all_logs.text,
        out,
        err,
        *(str(r.args) for r in all_logs.records),
    ):
        assert FAKE_TOKEN not in text


def test_an_unreachable_hub_fails_cleanly_and_leaves_the_model_alone(hub, tiny_model_dir):
    before = tree_hashes(tiny_model_dir)
    siblings = sorted(p.name for p in tiny_model_dir.parent.iterdir())
    with pytest.raises(HubError, match="cannot reach the Hub"):
        push_model(tiny_model_dir, "me/tiny", endpoint=f"http://127.0.0.1:{free_port()}")
    assert tree_hashes(tiny_model_dir) == before
    assert sorted(p.name for p in tiny_model_dir.parent.iterdir()) == siblings  # no staging left


def test_resolve_model_errors_say_what_went_wrong(auth_hub, tiny_model_dir, monkeypatch):
    push_model(tiny_model_dir, "me/private", private=True, token=FAKE_TOKEN)
    push_model(tiny_model_dir, "me/gated", token=FAKE_TOKEN)
    auth_hub.repos["me/gated"].gated = True

    with pytest.raises(ModelDirError, match="no model me/missing on http"):
        resolve_model("me/missing")
    with pytest.raises(ModelDirError, match="if it is private"):
        resolve_model("me/private")  # anonymous: a private repo looks like no repo at all
    with pytest.raises(ModelDirError, match="gated"):
        resolve_model("me/gated")
    with pytest.raises(ModelDirError, match="no such model directory, and not a Hub repo id"):
        resolve_model("a/b/c")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(ModelDirError, match="rejected the credentials"):
        resolve_model("me/private")

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    assert (resolve_model("me/private") / "model.safetensors").exists()  # now cached

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ModelDirError, match="cannot reach"):
        resolve_model("me/gated")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelDirError, match="HF_HUB_OFFLINE"):
        resolve_model("me/gated")
    assert (resolve_model("me/private") / "config.json").exists()  # offline, from the cache


def write_fake_model(directory: Path, config: dict, provenance: dict | None = None) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    if provenance is not None:
        (directory / "appleslm.json").write_text(json.dumps(provenance))
    return directory


def test_card_for_a_quantized_weight_shared_leviathan_model(tmp_path):
    model = write_fake_model(
        tmp_path / "q4",
        {
            "model_type": "appleslm",
            "model_file": "appleslm_arch.py",
            "hidden_size": 576,
            "num_hidden_layers": 15,
            "layer_repeat": 2,
            "embedding": "leviathan",
            "vocab_size": 32000,
            "quantization": {
                "group_size": 64,
                "bits": 4,
                "mode": "affine",
                "model.layers.0.mlp.down_proj": {"group_size": 64, "bits": 6},
            },
        },
        {
            "params": {
                "params_total": 125_000_000,
                "params_embedding": 1_200_000,
                "params_non_embedding": 123_800_000,
                "layers_unique": 15,
                "layers_executed": 30,
            },
            "val_loss": 3.2189,
            "val_ppl": 24.998,
            "tokens_seen": 2_000_000_000,
            "data": {"source": "HuggingFaceFW/fineweb-edu"},
            "quantization": {"bits_per_weight": 4.5},
        },
    )
    card = render_model_card(model, "me/slm-4bit")
    assert card.data.library_name == "mlx" and card.data.pipeline_tag == "text-generation"
    assert card.data.license == "apache-2.0"
    assert card.data.tags == ["mlx", "appleslm", "leviathan", "mobilellm-ls", "4-bit"]
    text = card.text
    for expected in (
        "125,000,000 (125M)",
        "123,800,000",
        "| layers executed | 30 |",
        "HuggingFaceFW/fineweb-edu",
        "2,000,000,000 (2B)",
        "| validation perplexity | 25 |",
        "| bits | 4 |",
        "| group_size | 64 |",
        "| layers with their own settings | 1 |",
        "| bits per weight | 4.5 |",
        "each block runs 2 times in a row (30 layers executed)",
        'load("me/slm-4bit", trust_remote_code=True)',
        "mlx_lm.generate --model me/slm-4bit --trust-remote-code",
        "appleslm chat me/slm-4bit",
    ):
        assert expected in text, expected


def test_card_for_a_llama_export_shows_only_what_it_knows(tmp_path):
    model = write_fake_model(tmp_path / "export", {"model_type": "llama", "hidden_size": 64})
    card = render_model_card(model)
    assert card.data.tags == ["mlx", "llama"]
    assert 'load("export")\n' in card.text and "--trust-remote-code" not in card.text
    for absent in ("## Parameters", "## Training", "## Evaluation", "## Quantization"):
        assert absent not in card.text


def test_push_regenerates_its_own_card_but_keeps_a_handwritten_one(tiny_model_dir, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    path = write_model_card(model, "old/name")
    assert MARKER in path.read_text() and not list(model.glob(".README*"))
    assert "appleslm chat new/name" in push_model(model, "new/name", dry_run=True).card

    path.write_text("# My model\n\nWritten by hand.\n")
    assert push_model(model, "new/name", dry_run=True).card == "# My model\n\nWritten by hand.\n"


def test_push_from_the_model_directory_itself(hub, tiny_model_dir, tmp_path, monkeypatch):
    model = tmp_path / "here"
    shutil.copytree(tiny_model_dir, model)
    monkeypatch.chdir(model)
    result = push_model(".", "me/here")
    assert "README.md" in hub.repos["me/here"].files and result.commit
    assert tree_hashes(model) == tree_hashes(tiny_model_dir)  # nothing staged inside, nothing added


class SilentServer:
    """Accepts connections and never answers: a Hub that hangs."""

    def __enter__(self) -> str:
        import socket
        import threading

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(64)
        self.held: list = []
        threading.Thread(target=self.accept, daemon=True).start()
        return f"http://127.0.0.1:{self.socket.getsockname()[1]}"

    def accept(self) -> None:
        while True:
            try:
                self.held.append(self.socket.accept()[0])
            except OSError:
                return

    def __exit__(self, *exc) -> None:
        for connection in self.held:
            connection.close()
        self.socket.close()


def test_a_hub_that_never_answers_times_out_with_a_message(tiny_model_dir, monkeypatch, tmp_path):
    import time

    isolate_hub_client(monkeypatch, tmp_path / "hf")
    monkeypatch.setenv("APPLESLM_HUB_TIMEOUT", "1")
    before = tree_hashes(tiny_model_dir)
    siblings = sorted(p.name for p in tiny_model_dir.parent.iterdir())
    with SilentServer() as url:
        start = time.monotonic()
        with pytest.raises(HubError, match="APPLESLM_HUB_TIMEOUT"):
            push_model(tiny_model_dir, "me/tiny", endpoint=url, token=FAKE_TOKEN)
        monkeypatch.setenv("HF_ENDPOINT", url)
        with pytest.raises(ModelDirError, match="APPLESLM_HUB_TIMEOUT|cannot reach"):
            resolve_model("me/tiny")
        assert time.monotonic() - start < 60  # bounded: a few timeouts with retries, not forever
    assert tree_hashes(tiny_model_dir) == before
    assert sorted(p.name for p in tiny_model_dir.parent.iterdir()) == siblings  # no staging left


def test_a_server_that_is_not_a_hub_is_a_message(tiny_model_dir, monkeypatch, tmp_path):
    import http.server
    import threading

    class Page(http.server.BaseHTTPRequestHandler):
        def answer(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>a captive portal</html>")

        do_GET = do_POST = do_HEAD = answer

        def log_message(self, *args) -> None:
            pass

    isolate_hub_client(monkeypatch, tmp_path / "hf")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(HubError, match="not the Hub's JSON"):
            push_model(tiny_model_dir, "me/tiny", endpoint=url, token=FAKE_TOKEN)
        monkeypatch.setenv("HF_ENDPOINT", url)
        with pytest.raises(ModelDirError, match="not the Hub's JSON|not in the local Hub cache"):
            resolve_model("me/tiny")
    finally:
        server.shutdown()


def test_a_missing_local_path_with_one_slash_is_never_sent_to_the_hub(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    (tmp_path / "runs" / "tiny" / "config.json").write_text("{}")
    with pytest.raises(ModelDirError, match="no such model directory.*runs/: tiny"):
        resolve_model("runs/tiny-chat")
    assert hub.requests == []
