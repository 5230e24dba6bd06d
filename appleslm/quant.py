"""MLX affine quantization of a model directory, with a before/after quality report."""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.nn as nn
from mlx_lm.utils import compute_bits_per_weight, quantize_model

from appleslm.config import ConfigError
from appleslm.evaluate.perplexity import (
    eval_window,
    evaluate_tokens,
    fast_for_evaluation,
    held_out_tokens,
)
from appleslm.io.files import ModelDirError, Quality, QuantRecord, read_config, read_provenance
from appleslm.io.model_dir import (
    check_output_dir,
    display_name,
    load_model,
    model_reference,
    resolve_model,
    save_model_dir,
)

BITS = (2, 3, 4, 6, 8)
GROUP_SIZES = (32, 64, 128)
RECIPES = ("uniform", "mixed")  # mixed: embedding table and output head at 8 bits
EVAL_TOKENS = 60_000  # enough for a perplexity to 3 significant digits, fast on a CPU


@dataclass
class QuantReport:
    out_dir: Path
    bits: int
    group_size: int
    recipe: str
    bits_per_weight: float
    size_bytes: int
    float_size_bytes: int
    skipped: list[str] = field(default_factory=list)
    ppl_before: float | None = None
    ppl_after: float | None = None
    eval_tokens: int = 0
    eval_window: int = 0
    measured_on: str = ""  # which text the perplexities are of, for people
    recorded: Quality | None = None  # the float model's own record, from its training

    @property
    def ppl_change(self) -> float | None:
        if self.ppl_before is None or self.ppl_after is None:
            return None
        return self.ppl_after / self.ppl_before - 1


def weights_size(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("model*.safetensors"))


def ungroupable(model: nn.Module, group_size: int) -> list[str]:
    """Layers that stay in float because their input dimension is not a multiple of the group."""
    return [
        f"{path} (input dim {module.weight.shape[-1]})"
        for path, module in model.named_modules()
        if hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size
    ]


def quant_predicate(model: nn.Module, bits: int, group_size: int, recipe: str):
    """The model's own predicate (our generator stays float) plus the recipe's higher bits for
    the embedding table and output head."""
    own = getattr(model, "quant_predicate", None)
    head_bits = max(bits, 8) if recipe == "mixed" else bits

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if own is not None and not own(path, module):
            return False
        if head_bits != bits and path.split(".")[-1] in ("embed_tokens", "lm_head"):
            return {"group_size": group_size, "bits": head_bits, "mode": "affine"}
        return True

    return predicate


def quantize(
    model_spec: str | Path,
    out_dir: str | Path,
    *,
    bits: int = 4,
    group_size: int = 64,
    recipe: str = "uniform",
    eval_text: str | None = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
) -> QuantReport:
    """Quantize `model_spec` into `out_dir`, measuring the perplexity before and after on
    `eval_text` or the model's own held-out data. `progress` None: bars on a terminal only."""
    progress = sys.stderr.isatty() if progress is None else progress
    if bits not in BITS or group_size not in GROUP_SIZES or recipe not in RECIPES:
        raise ConfigError(
            f"bits must be one of {BITS}, group size one of {GROUP_SIZES}, recipe one of {RECIPES}"
        )
    check_output_dir(Path(out_dir), overwrite)
    model_dir = resolve_model(model_spec)
    config = read_config(model_dir)
    if "quantization" in config:
        raise ModelDirError(f"{model_dir} is already quantized; quantize the float model")
    model, tokenizer = load_model(model_dir, trust_remote_code=trust_remote_code)
    if eval_text is None:
        log("rebuilding the held-out split of the model's training data...")
    tokens = held_out_tokens(model_dir, tokenizer, eval_text, EVAL_TOKENS)
    seq_len = eval_window(model)
    measured_on = "the given text" if eval_text else "held-out documents of the training data"

    def perplexity(which: str) -> dict[str, Any] | None:
        if tokens is None:
            return None
        log(f"measuring the {which} model on {len(tokens):,} tokens of {measured_on}...")
        # A copy with the same weight values in the device's fastest form: on the CPU, MLX's
        # quantized kernels are an order of magnitude slower than dequantized float32.
        fast = fast_for_evaluation(copy.deepcopy(model))
        return evaluate_tokens(fast, tokens, seq_len, progress=progress)

    before = perplexity("float")
    skipped = ungroupable(model, group_size)
    predicate = quant_predicate(model, bits, group_size, recipe)
    log(f"quantizing to {bits} bits (groups of {group_size}, recipe {recipe})...")
    model, config = quantize_model(model, config, group_size, bits, quant_predicate=predicate)
    after = perplexity("quantized")

    provenance = read_provenance(model_dir)
    recorded = provenance.quality
    provenance.name = display_name(out_dir)
    provenance.base_model = model_reference(model_spec, model_dir)
    provenance.quantization = QuantRecord(
        bits=bits,
        group_size=group_size,
        recipe=recipe,
        bits_per_weight=compute_bits_per_weight(model),
        kept_float=skipped,
        ppl_float=before and before["ppl"],
        ppl_quantized=after and after["ppl"],
        eval_tokens=0 if tokens is None else len(tokens),
    )
    if after is not None:
        provenance.quality = Quality(after["loss"], after["ppl"], after["tokens"], measured_on)
    out = save_model_dir(
        out_dir,
        model,
        tokenizer_dir=model_dir,
        provenance=provenance,
        config=config,
        overwrite=overwrite,
    )
    return QuantReport(
        out,
        bits,
        group_size,
        recipe,
        compute_bits_per_weight(model),
        weights_size(out),
        weights_size(model_dir),
        skipped,
        before and before["ppl"],
        after and after["ppl"],
        0 if tokens is None else len(tokens),
        seq_len,
        measured_on,
        recorded,
    )


def format_report(report: QuantReport) -> str:
    lines = [
        f"quantized to {report.out_dir}: {report.bits}-bit affine, group size "
        f"{report.group_size}, recipe {report.recipe}",
        f"  size on disk   {report.size_bytes / 1e6:.2f} MB "
        f"(float: {report.float_size_bytes / 1e6:.2f} MB)",
        f"  bits/weight    {report.bits_per_weight:.3f}",
    ]
    if report.ppl_before is not None:
        lines.append(
            f"  perplexity     {report.ppl_before:.3f} -> {report.ppl_after:.3f} "
            f"({100 * report.ppl_change:+.2f}%) on {report.eval_tokens:,} tokens of "
            f"{report.measured_on}, in windows of {report.eval_window}"
        )
        recorded = report.recorded
        if recorded is not None and report.measured_on == recorded.split:
            lines.append(
                f"  (training recorded {recorded.ppl:.3f} on {recorded.tokens:,} held-out tokens "
                "in its own training windows: other tokens, and less context per token)"
            )
    else:
        lines.append("  perplexity     not measured (no --eval-text and no training data record)")
    for path in report.skipped:
        lines.append(f"  kept in float: {path}, not a multiple of group size {report.group_size}")
    return "\n".join(lines)
