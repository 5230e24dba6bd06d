"""Model directories in and out: `files` (names, readers, provenance), `model_dir` (resolve, load,
the one writer), `hub` (every Hub call), `push`, `card`, `export`, `gguf`."""
