"""appleslm: train, quantize, chat with and share small language models with MLX."""

__version__ = "0.1.0"
