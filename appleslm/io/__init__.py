"""Model directories in and out: save/load, the Hub, GGUF import, export to stock mlx-lm."""

from appleslm.io.model_dir import ModelDirError, load_model, save_model_dir

__all__ = ["ModelDirError", "load_model", "save_model_dir"]
