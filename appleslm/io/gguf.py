"""Import a llama.cpp GGUF checkpoint as a standard mlx-lm ``llama`` model directory.

`import_gguf(FILE, OUT)` writes ``config.json`` (``model_type: llama``), ``model.safetensors`` with
mlx-lm's llama key names, ``tokenizer.json`` + ``tokenizer_config.json`` rebuilt from the GGUF's
tokenizer metadata (with its chat template), and ``appleslm.json`` provenance. The result loads with
plain ``mlx_lm.load(OUT)``: no custom model code and no ``trust_remote_code``.

Three things make this more than a rename:

* **Quantized tensors stay quantized.** ``mx.load`` reads Q4_0, Q4_1 and Q8_0 blocks straight into
  MLX's affine layout (uint32-packed ``weight`` + float16 ``scales`` and ``biases``, group size 32),
  exactly: Q4_0's implicit zero point becomes ``biases = -8 * scale``, Q8_0's ``-128 * scale``.
  We write those arrays as they are and add mlx-lm's ``quantization`` entry to ``config.json``, so
  a 4-bit GGUF stays a 4-bit MLX model rather than going through a float round trip. With
  ``dtype="float16"`` or ``"float32"`` they are dequantized instead, after the same conversion.
* **RoPE layout.** llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` within each head
  so that its interleaved ("traditional", adjacent-pair) RoPE rotates the same coordinate pairs
  that HF's rotate-half RoPE rotates. mlx-lm's llama uses rotate-half, so we undo that permutation.
  It reorders *output rows* only, and quantization groups run along the input (column) axis, so
  the same row permutation applies to ``weight``, ``scales`` and ``biases`` without dequantizing.
* **Tokenizer.** A GGUF carries no ``tokenizer.json``, only llama.cpp's metadata (token strings,
  merges or scores, token types, special ids and a pre-tokenizer *name*). We rebuild an HF
  ``tokenizers`` BPE from it that splits text as llama.cpp does: byte-level BPE ("gpt2") with the
  split rules of the named pre-tokenizer, or SentencePiece BPE ("llama") with merges ranked by
  score and byte fallback.

Supported: ``general.architecture == "llama"``, dense (no MoE), full-width RoPE without llama3-style
frequency tensors, tensor types F32, F16, BF16, Q8_0, Q4_0 and Q4_1, and "gpt2" (pre-tokenizers
gpt2/default, smollm, llama-bpe) or "llama" tokenizers. Everything else is refused with a
`GGUFError` that names the problem, because a silently wrong conversion would just look like a
bad model.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import struct
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from appleslm.errors import AppleslmError, MissingFileError
from appleslm.io.files import Provenance
from appleslm.io.model_dir import check_output_dir, save_model_dir

__all__ = [
    "DTYPES",
    "SUPPORTED_TENSOR_TYPES",
    "GGUFError",
    "GGUFHeader",
    "GGUFTensorInfo",
    "import_gguf",
    "read_gguf_header",
]


class GGUFError(AppleslmError, ValueError):
    """A GGUF file this importer cannot convert, with a message that says why."""


# ggml tensor type ids (ggml.h `enum ggml_type`), named so refusals can say what a file holds.
_GGML_TYPE_NAMES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    6: "Q5_0",
    7: "Q5_1",
    8: "Q8_0",
    9: "Q8_1",
    10: "Q2_K",
    11: "Q3_K",
    12: "Q4_K",
    13: "Q5_K",
    14: "Q6_K",
    15: "Q8_K",
    16: "IQ2_XXS",
    17: "IQ2_XS",
    18: "IQ3_XXS",
    19: "IQ1_S",
    20: "IQ4_NL",
    21: "IQ3_S",
    22: "IQ2_S",
    23: "IQ4_XS",
    24: "I8",
    25: "I16",
    26: "I32",
    27: "I64",
    28: "F64",
    29: "IQ1_M",
    30: "BF16",
    34: "TQ1_0",
    35: "TQ2_0",
    39: "MXFP4",
}
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
# What the imported weights are: "keep" the file's types (quantized blocks as MLX quantized
# weights), or every weight dequantized to one float type.
DTYPES = ("keep", "float16", "float32")
# MLX maps these ggml block formats onto its affine quantization with 32-element groups.
_QUANT_BITS = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4}
_GROUP_SIZE = 32
# K-quants are deliberately absent: mx.load dequantizes some of them to float16, but on random
# blocks its Q4_K result disagreed with the gguf package's reference dequantizer, so we refuse
# rather than import weights we cannot vouch for.

# GGUF tensor name -> mlx-lm llama parameter path (without the .weight/.scales/.biases suffix).
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# --------------------------------------------------------------------------------------------
# GGUF header reader
# --------------------------------------------------------------------------------------------


@dataclass
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # row-major (NumPy/MLX) order: GGUF stores dims innermost-first
    type_name: str
    offset: int  # absolute byte offset of the tensor data in the file

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo] = field(default_factory=dict)


_SCALAR_FORMATS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NUMPY_DTYPES = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Little-endian reads from a memory-mapped file, with a clear error on truncation."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > len(self.buf):
            raise GGUFError(f"{self.path}: truncated or corrupt GGUF header")
        self.pos += n
        return start

    def unpack(self, fmt: str) -> Any:
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        start = self.take(n)
        return bytes(self.buf[start : start + n]).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            if item_type in _NUMPY_DTYPES:
                dtype = np.dtype(_NUMPY_DTYPES[item_type])
                start = self.take(count * dtype.itemsize)
                return np.frombuffer(self.buf, dtype=dtype, count=count, offset=start).copy()
            return [self.value(item_type) for _ in range(count)]
        raise GGUFError(f"{self.path}: unknown GGUF metadata value type {vtype}")


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Parse a GGUF file's metadata and tensor table (no tensor data is read).

    Numeric metadata arrays come back as NumPy arrays, string arrays as lists, scalars as Python
    values. We parse the header ourselves, rather than trusting `mx.load` alone, so that tensor
    types and the architecture can be checked with a useful message before any weights load.
    """
    path = Path(path)
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as e:  # an empty file cannot be mapped
            raise GGUFError(f"{path}: not a GGUF file (empty)") from e
    try:
        cur = _Cursor(buf, path)
        if len(buf) < 4 or buf[:4] != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file (bad magic {bytes(buf[:4])!r})")
        cur.take(4)
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise GGUFError(f"{path}: unsupported GGUF version {version} (need 2 or 3)")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.unpack("<I"))
        raw = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.unpack("<I")
            dims = [cur.unpack("<Q") for _ in range(n_dims)]
            type_id, offset = cur.unpack("<I"), cur.unpack("<Q")
            raw.append((name, tuple(reversed(dims)), type_id, offset))
        alignment = int(metadata.get("general.alignment", 32))
        data_start = -(-cur.pos // alignment) * alignment
        tensors = {
            name: GGUFTensorInfo(name, shape, _GGML_TYPE_NAMES.get(t, f"type {t}"), data_start + o)
            for name, shape, t, o in raw
        }
        return GGUFHeader(version, metadata, tensors)
    finally:
        buf.close()


# --------------------------------------------------------------------------------------------
# Model config and weights
# --------------------------------------------------------------------------------------------


def _f32(value: float) -> float:
    """The shortest decimal that reads back as the same float32 (GGUF stores f32): 1e-05, not
    9.999999747378752e-06."""
    return float(str(np.float32(value)))


def _llama_config(header: GGUFHeader, path: Path) -> dict[str, Any]:
    meta = header.metadata
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(
            f"{path}: architecture {arch!r} is not supported; only 'llama' GGUFs can be imported"
        )

    def need(key: str) -> Any:
        if f"llama.{key}" not in meta:
            raise GGUFError(f"{path}: GGUF metadata lacks llama.{key}")
        return meta[f"llama.{key}"]

    if int(meta.get("llama.expert_count", 0) or 0) > 0:
        raise GGUFError(f"{path}: mixture-of-experts llama GGUFs are not supported")
    for key in (
        "llama.feed_forward_length",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
    ):
        if isinstance(meta.get(key), np.ndarray):  # per-layer values: not a uniform llama
            raise GGUFError(f"{path}: per-layer {key} is not supported")

    hidden = int(need("embedding_length"))
    n_heads = int(need("attention.head_count"))
    n_kv = int(meta.get("llama.attention.head_count_kv", n_heads))
    head_dim = int(meta.get("llama.attention.key_length", hidden // n_heads))
    if int(meta.get("llama.attention.value_length", head_dim)) != head_dim:
        raise GGUFError(f"{path}: different key and value head sizes are not supported")
    rope_dims = int(meta.get("llama.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise GGUFError(
            f"{path}: partial RoPE ({rope_dims} of {head_dim} head dims) is not supported"
        )
    if "rope_freqs.weight" in header.tensors:
        raise GGUFError(
            f"{path}: llama3-style RoPE frequency scaling (rope_freqs.weight) is not supported"
        )

    embd = header.tensors.get("token_embd.weight")
    if embd is None:
        raise GGUFError(f"{path}: no token_embd.weight tensor")
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": int(need("block_count")),
        "intermediate_size": int(need("feed_forward_length")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": _f32(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(meta.get("llama.rope.freq_base", 10000.0)),
        # The embedding table is the ground truth; older files omit llama.vocab_size.
        "vocab_size": int(embd.shape[0]),
        "max_position_embeddings": int(meta.get("llama.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in header.tensors,
        "attention_bias": False,
        "mlp_bias": False,
    }
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {
            "type": "linear",
            "factor": _f32(meta["llama.rope.scaling.factor"]),
        }
    elif scaling not in ("none", None):
        raise GGUFError(f"{path}: RoPE scaling type {scaling!r} is not supported")
    return config


def _target_name(gguf_name: str, n_layers: int) -> tuple[str, str] | None:
    """('model.layers.3.self_attn.q_proj', 'weight') for 'blk.3.attn_q.weight', else None."""
    stem, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "scales", "biases"):
        return None
    if stem in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[stem], suffix
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        if int(parts[1]) < n_layers:
            return f"model.layers.{int(parts[1])}.{_BLOCK_NAMES[parts[2]]}", suffix
    return None


def _check_tensors(header: GGUFHeader, config: dict[str, Any], path: Path) -> None:
    """Refuse unsupported tensor types and unknown or missing tensors before loading anything."""
    bad = {
        n: t.type_name
        for n, t in header.tensors.items()
        if t.type_name not in SUPPORTED_TENSOR_TYPES
    }
    if bad:
        types = ", ".join(sorted(set(bad.values())))
        example = next(iter(bad))
        raise GGUFError(
            f"{path}: unsupported tensor type(s) {types} ({len(bad)} tensors, e.g. {example}); "
            f"supported: {', '.join(SUPPORTED_TENSOR_TYPES)}. Re-quantize the model to one of "
            "those (llama-quantize ... Q4_1, Q8_0 or F16) and import that."
        )
    n_layers = config["num_hidden_layers"]
    unknown = [n for n in header.tensors if _target_name(n, n_layers) is None]
    if unknown:
        raise GGUFError(
            f"{path}: tensors a plain llama model does not have: {', '.join(unknown[:5])}"
            + (" ..." if len(unknown) > 5 else "")
        )
    expected = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{part}.weight" for i in range(n_layers) for part in _BLOCK_NAMES
    }
    missing = sorted(expected - set(header.tensors))
    if missing:
        raise GGUFError(f"{path}: missing tensors: {', '.join(missing[:5])}")
    for name, info in header.tensors.items():
        if info.type_name in _QUANT_BITS and info.shape[-1] % _GROUP_SIZE:
            raise GGUFError(f"{path}: {name} has {info.shape[-1]} columns, not a multiple of 32")


def _unpermute_rows(x: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's Q/K row permutation (convert_hf_to_gguf.py `permute`).

    llama.cpp stored rows of each head as (head_dim/2, 2): the pair (i, i + head_dim/2) that
    rotate-half RoPE rotates together sits at adjacent rows 2i, 2i+1, where interleaved RoPE
    expects it. Reshaping to (heads, head_dim/2, 2) and swapping the last two row axes puts the
    halves back. Only axis 0 (output rows) moves, so this is valid for packed quantized weights
    and their per-row scales/biases alike.
    """
    rows = x.shape[0]
    if rows % n_heads or (rows // n_heads) % 2:
        raise GGUFError(f"cannot split {rows} rows into {n_heads} RoPE heads")
    tail = tuple(x.shape[1:])
    out = x.reshape(n_heads, rows // n_heads // 2, 2, *tail).swapaxes(1, 2).reshape(x.shape)
    return mx.contiguous(out)


def _read_bf16(path: Path, info: GGUFTensorInfo) -> mx.array:
    """BF16 straight from the file: mx.load would widen it into float16, which clips to ±65504
    and flushes tiny values, so we read the raw bits and reinterpret them instead."""
    raw = np.fromfile(path, dtype="<u2", count=info.n_elements, offset=info.offset)
    return mx.array(raw.reshape(info.shape)).view(mx.bfloat16)


def _convert_weights(
    path: Path, header: GGUFHeader, config: dict[str, Any]
) -> tuple[dict[str, mx.array], dict[str, Any] | None]:
    """Load with mx.load and rename/unpermute into mlx-lm llama names; also the quantization map."""
    try:
        loaded = mx.load(str(path))
    except (RuntimeError, ValueError) as e:
        raise GGUFError(f"{path}: MLX could not read the tensors: {e}") from e

    n_layers = config["num_hidden_layers"]
    weights = {}
    for name, array in loaded.items():
        target = _target_name(name, n_layers)
        if target is None:  # _check_tensors saw every GGUF tensor; this is MLX's naming
            raise GGUFError(f"{path}: unexpected tensor {name} from mx.load")
        module, suffix = target
        info = header.tensors.get(f"{name.rpartition('.')[0]}.weight")
        if info is not None and info.type_name == "BF16":
            array = _read_bf16(path, info)
        if module.endswith("self_attn.q_proj"):
            array = _unpermute_rows(array, config["num_attention_heads"])
        elif module.endswith("self_attn.k_proj"):
            array = _unpermute_rows(array, config["num_key_value_heads"])
        weights[f"{module}.{suffix}"] = array

    # mlx-lm's quantization map: the most common bit width is the default, every quantized
    # module that differs (typically an 8-bit embedding beside 4-bit linears) gets its own entry.
    quant_bits: dict[str, int] = {}
    for gguf_name, info in header.tensors.items():
        if info.type_name in _QUANT_BITS:
            module, _ = _target_name(gguf_name, n_layers)  # type: ignore[misc]
            quant_bits[module] = _QUANT_BITS[info.type_name]
            if f"{module}.scales" not in weights:
                raise GGUFError(f"{path}: MLX did not return {gguf_name} as quantized")
    quantization = None
    if quant_bits:
        default = Counter(quant_bits.values()).most_common(1)[0][0]
        quantization = {"group_size": _GROUP_SIZE, "bits": default, "mode": "affine"}
        for module, bits in sorted(quant_bits.items()):
            if bits != default:
                quantization[module] = {"group_size": _GROUP_SIZE, "bits": bits, "mode": "affine"}
    return weights, quantization


def _llama_model(config: dict[str, Any], weights: dict[str, mx.array]) -> nn.Module:
    """mlx-lm's llama with the converted weights loaded, quantized layers where the GGUF was.

    Loading strictly into the real architecture checks every name and shape before anything is
    written; the skeleton is quantized layer by layer as mlx-lm's own loader does.
    """
    from mlx_lm.models import llama
    from mlx_lm.utils import infer_quant_config

    model = llama.Model(llama.ModelArgs.from_dict(config))
    quantization = config.get("quantization")
    if quantization is not None:

        def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
            if isinstance(quantization.get(path), dict):
                return quantization[path]
            if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
                return False
            return infer_quant_config(path, module, weights)

        nn.quantize(
            model, quantization["group_size"], quantization["bits"], class_predicate=predicate
        )
    model.load_weights(list(weights.items()), strict=True)
    return model


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) -> the split regex its llama-vocab.cpp
# applies. None means GPT-2's own regex, which ByteLevel(use_regex=True) implements.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "default": ("gpt2",),
    "gpt2": ("gpt2",),
    # llama.cpp isolates every \p{N} first, then applies the GPT-2 regex; upstream SmolLM's
    # tokenizer.json says the same with Digits(individual_digits=True) before ByteLevel.
    "smollm": ("digits", "gpt2"),
    "llama-bpe": ("llama3",),
    "llama3": ("llama3",),
    "llama-v3": ("llama3",),
    "smaug-bpe": ("llama3",),
}
# llama.cpp token types (llama_token_type).
_TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_BYTE = 2, 3, 4, 6


def _add_bos_default(meta: dict[str, Any]) -> bool:
    # llama.cpp adds BOS to a SentencePiece vocabulary whose file does not say otherwise.
    default = meta.get("tokenizer.ggml.model") == "llama"
    return bool(meta.get("tokenizer.ggml.add_bos_token", default))


def _byte_level_bpe(
    meta: dict[str, Any], tokens: list[str], vocab: dict[str, int], path: Path
) -> Tokenizer:
    """GPT-2-style byte-level BPE ("gpt2"): the file's merges, split by its pre-tokenizer."""
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise GGUFError(
            f"{path}: pre-tokenizer {pre!r} is not supported (known: "
            f"{', '.join(sorted(_PRE_TOKENIZERS))})"
        )
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    steps = _PRE_TOKENIZERS[pre]
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            fuse_unk=False,
            byte_fallback=False,
            # Llama 3's HF tokenizer looks whole words up in the vocab before merging.
            ignore_merges="llama3" in steps,
        )
    )
    parts = []
    for step in steps:
        if step == "digits":
            parts.append(pre_tokenizers.Digits(individual_digits=True))
        elif step == "llama3":
            parts.append(pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"))
    parts.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex="gpt2" in steps))
    tokenizer.pre_tokenizer = parts[0] if len(parts) == 1 else pre_tokenizers.Sequence(parts)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(
    meta: dict[str, Any],
    tokens: list[str],
    vocab: dict[str, int],
    types: np.ndarray | None,
    path: Path,
) -> Tokenizer:
    """SentencePiece BPE ("llama": Llama 2, TinyLlama, Mistral) as HF's Llama tokenizer has it.

    The file has scores, not merges. llama.cpp merges the adjacent pair whose merged piece scores
    highest; a BPE merge list ranked by that score does the same, so we derive one (as
    transformers does for GGUF). Text is spelled with "▁" for spaces; characters without a piece
    fall back to the <0xNN> byte tokens.
    """
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None:
        raise GGUFError(f"{path}: SentencePiece vocabulary without tokenizer.ggml.scores")
    scores = np.asarray(scores, dtype=np.float64)
    mergeable = np.ones(len(tokens), dtype=bool)
    if types is not None:  # specials and byte tokens never come out of a merge
        mergeable = ~np.isin(types, (_TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_BYTE))
    ranked = []
    for i, piece in enumerate(tokens):
        if not mergeable[i] or vocab.get(piece) != i:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if (
                left in vocab
                and right in vocab
                and mergeable[vocab[left]]
                and mergeable[vocab[right]]
            ):
                ranked.append((-scores[i], vocab[left], vocab[right], left, right))
    ranked.sort()
    merges = [(left, right) for *_, left, right in ranked]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    # llama.cpp puts a space before every text fragment that starts the input or follows a
    # special token ("always"), unless the file sets add_space_prefix false.
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581",
        prepend_scheme="always" if prefix else "never",
        split=False,
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _build_tokenizer(meta: dict[str, Any], path: Path) -> Tokenizer:
    """A `tokenizers.Tokenizer` that splits text the way llama.cpp does for this vocabulary."""
    kind = meta.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise GGUFError(
            f"{path}: tokenizer model {kind!r} is not supported; byte-level BPE ('gpt2') and "
            "SentencePiece BPE ('llama') vocabularies can be rebuilt"
        )
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # a duplicated string keeps its first id
    types = meta.get("tokenizer.ggml.token_type")
    types = None if types is None else np.asarray(types)
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(meta, tokens, vocab, path)
    else:
        tokenizer = _sentencepiece_bpe(meta, tokens, vocab, types, path)

    # Control tokens (<|im_start|>, <s> ...) must match whole and be skippable when decoding;
    # user-defined ones match whole but are ordinary text. Both already have ids in the vocab.
    if types is not None:
        special = (types == _TOKEN_CONTROL) | (types == _TOKEN_UNKNOWN)
        tokenizer.add_special_tokens(
            [
                AddedToken(tokens[i], special=True, normalized=False)
                for i in np.flatnonzero(special)
                if vocab.get(tokens[i]) == i
            ]
        )
        tokenizer.add_tokens(
            [
                AddedToken(tokens[i], special=False, normalized=False)
                for i in np.flatnonzero(types == _TOKEN_USER_DEFINED)
                if vocab.get(tokens[i]) == i
            ]
        )

    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    eos_id = meta.get("tokenizer.ggml.eos_token_id")
    add_bos = _add_bos_default(meta) and bos_id is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos_id is not None
    if add_bos or add_eos:
        bos, eos = (tokens[int(i)] if i is not None else None for i in (bos_id, eos_id))
        pre_t, post_t = (f"{bos}:0 " if add_bos else ""), (f" {eos}:0" if add_eos else "")
        specials = ([(bos, int(bos_id))] if add_bos else []) + (
            [(eos, int(eos_id))] if add_eos and eos != bos else []
        )
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{pre_t}$A:0{post_t}",
            pair=f"{pre_t}$A:0{post_t} {pre_t}$B:1{post_t}",
            special_tokens=specials,
        )
    elif kind == "gpt2":
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _tokenizer_config(meta: dict[str, Any], max_len: int) -> tuple[dict[str, Any], list[int]]:
    """tokenizer_config.json contents and the eos ids generation should stop on."""
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": _add_bos_default(meta),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
    }
    cfg = {k: v for k, v in cfg.items() if v is not None}
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str) and template:
        cfg["chat_template"] = template
    # End-of-turn ids (Llama 3's <|eot_id|>) must stop generation as well as eos.
    eos_ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is not None and int(i) not in eos_ids:
            eos_ids.append(int(i))
    return cfg, eos_ids


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def import_gguf(
    gguf_path: str | Path, out_dir: str | Path, *, dtype: str = "keep", overwrite: bool = False
) -> Path:
    """Convert a llama-architecture GGUF file into an mlx-lm model directory and return its path.

    ``dtype`` "keep" keeps the file's tensor types (quantized blocks stay MLX quantized weights);
    "float16" or "float32" dequantizes every quantized weight and casts all weights to that type
    (on MLX's CPU backend float32 runs faster than quantized weights; on a Mac's GPU, the other
    way round).

    Raises FileNotFoundError for a missing file, FileExistsError when ``out_dir`` is a file or a
    non-empty directory (unless ``overwrite``, which replaces the whole directory), and
    `GGUFError` for a file it cannot convert faithfully. ``out_dir`` is only touched once the
    whole conversion has succeeded.
    """
    gguf_path, out_dir = Path(gguf_path).expanduser(), Path(out_dir).expanduser().resolve()
    if dtype not in DTYPES:
        raise GGUFError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not gguf_path.is_file():
        raise MissingFileError(f"GGUF file not found: {gguf_path}")
    check_output_dir(out_dir, overwrite)

    header = read_gguf_header(gguf_path)
    config = _llama_config(header, gguf_path)
    _check_tensors(header, config, gguf_path)
    tokenizer = _build_tokenizer(header.metadata, gguf_path)
    tok_config, eos_ids = _tokenizer_config(header.metadata, config["max_position_embeddings"])
    weights, quantization = _convert_weights(gguf_path, header, config)

    bos_id = header.metadata.get("tokenizer.ggml.bos_token_id")
    if bos_id is not None:
        config["bos_token_id"] = int(bos_id)
    if eos_ids:
        config["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    if quantization is not None:
        # mlx-lm's own save_config mirrors the map into quantization_config too.
        config["quantization"] = quantization
        config["quantization_config"] = quantization
    model = _llama_model(config, weights)
    if dtype != "keep":
        from mlx_lm.utils import dequantize_model

        model = dequantize_model(model)
        model.set_dtype(getattr(mx, dtype))
        config.pop("quantization", None)
        config.pop("quantization_config", None)
        config["torch_dtype"] = dtype  # the transformers key for the weights' float type
    provenance = Provenance(
        name=out_dir.name,
        variant="llama",
        params={"params_total": sum(t.n_elements for t in header.tensors.values())},
        base_model=header.metadata.get("general.name") or gguf_path.stem,
        imported_from={
            "format": "GGUF",
            "file": gguf_path.name,
            "sha256": _sha256(gguf_path),
            "tensor_types": sorted({t.type_name for t in header.tensors.values()}),
            "dtype": dtype,
        },
    )
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        tokenizer.save(str(Path(tokenizer_dir) / "tokenizer.json"))
        (Path(tokenizer_dir) / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
        save_model_dir(
            out_dir,
            model,
            tokenizer_dir=tokenizer_dir,
            provenance=provenance,
            config=config,
            overwrite=overwrite,
        )
    return out_dir
