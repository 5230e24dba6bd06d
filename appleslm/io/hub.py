"""The Hugging Face Hub: resolve a MODEL argument to a local directory."""

from __future__ import annotations

from pathlib import Path

MODEL_PATTERNS = ["*.json", "model*.safetensors", "*.py", "tokenizer.model", "*.tiktoken",
                  "*.txt", "*.jsonl", "*.jinja", "README.md"]


def resolve_model(spec: str | Path) -> Path:
    """A local model directory as is; anything else is a Hub repo id, downloaded once and cached."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    from appleslm.io.model_dir import ModelDirError

    text = str(spec)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise ModelDirError(f"{text!r} is neither a local model directory nor a Hub repo id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, allow_patterns=MODEL_PATTERNS))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise ModelDirError(f"cannot download {text!r} from the Hub: {e}") from e
