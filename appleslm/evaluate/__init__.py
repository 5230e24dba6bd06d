"""Evaluation: loss, perplexity and bits per byte on text (`perplexity`), zero-shot accuracy on
the small-model papers' tasks (`zeroshot`, with the task schemas and readers in `tasks`)."""

from appleslm.errors import AppleslmError


class EvaluationError(AppleslmError, ValueError):
    """An evaluation that cannot run as asked: a bad setting, bad task data, nothing to score."""
