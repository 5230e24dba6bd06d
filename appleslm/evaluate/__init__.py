"""Evaluation: loss, perplexity and bits per byte of any model on any text."""
