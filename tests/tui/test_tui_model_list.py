"""The model picker's listing: local model directories and the Hugging Face cache."""

from __future__ import annotations

import shutil

from appleslm_tui.model_list import label, list_models


def test_local_dirs_hub_cache_and_recent(tmp_path, tiny_model_dir):
    local = tmp_path / "projects" / "runs"
    shutil.copytree(tiny_model_dir, local / "mine")
    (tmp_path / "projects" / "notes").mkdir()
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--chat-model" / "snapshots" / "abc123"
    shutil.copytree(tiny_model_dir, snapshot)
    (cache / "models--org--chat-model" / "refs").mkdir()
    (cache / "models--org--chat-model" / "refs" / "main").write_text("abc123")
    (cache / "datasets--org--data").mkdir()

    entries = list_models(
        [tmp_path / "projects"], recent=["org/remote-only", str(local / "mine")], hub_cache=cache
    )
    assert [(e.name, e.source) for e in entries] == [
        ("org/remote-only", "recent"),
        ("mine", "recent"),
        ("org/chat-model", "hub cache"),
    ]
    assert entries[2].spec == str(snapshot) and entries[2].detail.startswith("appleslm · ")
    assert label(str(snapshot)) == "org/chat-model" and label("/a/b/tiny") == "tiny"
    assert [e.name for e in list_models([tmp_path / "projects"], hub_cache=False)] == ["mine"]
