"""Generation, thin over mlx-lm: sampling settings, a multi-turn chat session with a reused KV
cache, live statistics, and a plain text stream for the CLI; a draft model for speculative
decoding and the proxy-tuned composite of three models.

Everything that decides tokens is mlx-lm's (`stream_generate`, `make_sampler`,
`make_logits_processors`, `make_prompt_cache`, `trim_prompt_cache`, speculative decoding through
`stream_generate(draft_model=...)`); this module only chooses what to feed it. The chat UI
(`tui/`), `appleslm generate` and `appleslm eval --proxy` all sit on top of it.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import GenerationResponse, stream_generate
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from appleslm.errors import AppleslmError
from appleslm.models import context_length

Message = Mapping[str, str]
"""A chat message: {"role": "system" | "user" | "assistant", "content": text}."""

PREFILL_STEP = 512
"""Prompt tokens per prefill call. mlx-lm's default is 2048; smaller steps let a stop request
(checked between steps) interrupt a long prompt sooner at a negligible cost in prefill speed."""


class GenerationError(AppleslmError, RuntimeError):
    """A reply could not be generated; the message is meant for the user."""


class PromptTooLongError(GenerationError):
    """The prompt does not fit in the model's context window."""


class OutOfMemoryError(GenerationError):
    """MLX could not allocate memory for the prompt or the reply."""


class VocabularyError(GenerationError):
    """Models that must share a vocabulary (a draft, proxy-tuning's three) do not."""


class _Stopped(Exception):
    """Raised from the prefill progress callback to abandon a prompt the user stopped."""


@dataclass(frozen=True)
class SamplingSettings:
    """How the next token is chosen. Defaults are greedy decoding, mlx-lm's own defaults.

    `top_p` 1.0 (or 0.0, mlx-lm's spelling), `top_k` 0, `min_p` 0.0 and `repetition_penalty`
    1.0 each switch that filter off; `seed` None leaves MLX's random state alone.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = 512
    seed: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if not self.temperature >= 0:
            problems.append("temperature must be ≥ 0")
        if not 0 <= self.top_p <= 1:
            problems.append("top-p must be in [0, 1] (0 or 1 = off)")
        if self.top_k < 0:
            problems.append("top-k must be ≥ 0 (0 = off)")
        if not 0 <= self.min_p < 1:
            problems.append("min-p must be in [0, 1)")
        if not self.repetition_penalty > 0:
            problems.append("repetition penalty must be > 0 (1 = off)")
        if self.max_tokens < 1:
            problems.append("max tokens must be ≥ 1")
        if self.seed is not None and self.seed < 0:
            problems.append("seed must be ≥ 0")
        if problems:
            raise ValueError("; ".join(problems))

    def sampler(self) -> Callable[[mx.array], mx.array]:
        """mlx-lm's sampler for these settings (argmax when the temperature is 0)."""
        top_p = self.top_p if 0 < self.top_p < 1 else 0.0  # mlx-lm spells "off" as 0.0
        return make_sampler(temp=self.temperature, top_p=top_p, min_p=self.min_p, top_k=self.top_k)

    def logits_processors(self) -> list[Callable[[mx.array, mx.array], mx.array]]:
        penalty = self.repetition_penalty if self.repetition_penalty != 1.0 else None
        return make_logits_processors(repetition_penalty=penalty)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(
        cls, values: Mapping[str, Any] | None, default: SamplingSettings | None = None
    ) -> SamplingSettings:
        """Settings from stored JSON; unknown keys are ignored so old records keep loading."""
        base = dataclasses.asdict(default or cls())
        names = {f.name for f in dataclasses.fields(cls)}
        base.update({k: v for k, v in (values or {}).items() if k in names})
        return cls(**base)


@dataclass(frozen=True)
class Stats:
    """Figures for one reply, taken from mlx-lm's `GenerationResponse` unchanged.

    `ttft` is the wall time from the request to the first token (rendering, tokenizing and
    prefill); `prompt_tokens` counts only the tokens that were actually prefilled, while
    `cached_tokens` were reused from the previous turn's KV cache. `peak_memory` is in GB.
    With a draft model, `draft_tokens` counts the generated tokens the draft proposed and the
    model accepted (mlx-lm's `from_draft`); None without one.
    """

    ttft: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory: float = 0.0
    finish_reason: str | None = None
    draft_tokens: int | None = None

    @property
    def acceptance(self) -> float | None:
        """The share of the generated tokens that came from the draft, or None without one."""
        if self.draft_tokens is None or not self.generation_tokens:
            return None
        return self.draft_tokens / self.generation_tokens

    @classmethod
    def from_response(
        cls,
        response: GenerationResponse,
        *,
        ttft: float,
        cached_tokens: int = 0,
        draft_tokens: int | None = None,
    ) -> Stats:
        return cls(
            ttft=ttft,
            prompt_tokens=response.prompt_tokens,
            cached_tokens=cached_tokens,
            prompt_tps=response.prompt_tps,
            generation_tokens=response.generation_tokens,
            generation_tps=response.generation_tps,
            peak_memory=response.peak_memory,
            finish_reason=response.finish_reason,
            draft_tokens=draft_tokens,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Stats:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def summary(self) -> str:
        """One line for a footer or a log: the same figures mlx-lm's chat prints."""
        drafted = f" · draft {self.acceptance:.0%}" if self.acceptance is not None else ""
        return (
            f"TTFT {self.ttft:.2f}s · prompt {self.prompt_tps:.1f} tok/s · "
            f"gen {self.generation_tps:.1f} tok/s{drafted} · {self.generation_tokens} tok · "
            f"peak {self.peak_memory:.2f} GB"
        )


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        word in text for word in ("out of memory", "malloc", "allocat", "bad_alloc")
    )


def stream_tokens(
    model: Any,
    tokenizer: Any,
    prompt: str | Sequence[int],
    settings: SamplingSettings,
    *,
    max_tokens: int | None = None,
    prompt_cache: list[Any] | None = None,
    should_stop: Callable[[], bool] | None = None,
    draft: Draft | None = None,
) -> Iterator[GenerationResponse]:
    """mlx-lm's `stream_generate` with `settings` applied, a stop check and clear errors.

    `should_stop` is polled between prefill steps and between tokens; when it answers True the
    stream ends (a prompt still being prefilled is abandoned, a reply keeps what it has). With
    a `draft`, mlx-lm decodes speculatively (and, by its design, reports no prefill progress,
    so a stop waits for the prefill to end). Peak memory is reset first, so `peak_memory`
    describes this reply alone.
    """
    stop = should_stop or (lambda: False)

    def on_progress(done: int, total: int) -> None:
        if done < total and stop():
            raise _Stopped

    if settings.seed is not None:
        mx.random.seed(settings.seed)
    mx.reset_peak_memory()
    speculative = (
        {} if draft is None else {"draft_model": draft.model, "num_draft_tokens": draft.tokens}
    )
    responses = stream_generate(
        model,
        tokenizer,
        prompt if isinstance(prompt, str) else list(prompt),
        max_tokens=max_tokens or settings.max_tokens,
        sampler=settings.sampler(),
        logits_processors=settings.logits_processors(),
        prompt_cache=prompt_cache,
        prefill_step_size=PREFILL_STEP,
        prompt_progress_callback=on_progress,
        **speculative,
    )
    try:
        for response in responses:
            yield response
            if stop():
                return
    except _Stopped:
        return
    except GenerationError:
        raise
    except (MemoryError, RuntimeError) as e:
        if _is_out_of_memory(e):
            raise OutOfMemoryError(
                "Out of memory while generating. Try a smaller or quantized model, a shorter "
                f"conversation or fewer max tokens. ({e})"
            ) from e
        raise
    finally:
        responses.close()


def vocabulary_difference(mine: Any, theirs: Any) -> str | None:
    """How two tokenizers' vocabularies differ (their sizes, or the first id that maps to other
    tokens), or None when they are the same."""
    a, b = mine.get_vocab(), theirs.get_vocab()
    if a == b:
        return None
    if len(a) != len(b):
        return f"{len(a):,} vs {len(b):,} tokens"
    by_id = {i: t for t, i in b.items()}
    first = min(i for t, i in a.items() if by_id.get(i) != t)
    return f"token {first} is {dict((i, t) for t, i in a.items())[first]!r} vs {by_id.get(first)!r}"


def check_vocabulary(what: str, tokenizer: Any, other: Any) -> None:
    difference = vocabulary_difference(tokenizer, other)
    if difference:
        raise VocabularyError(
            f"{what} has another vocabulary than the model ({difference}); it must use the "
            "model's tokenizer (train it with data.tokenizer=MODEL, e.g. appleslm distill)"
        )


def check_cache_split(model: Any) -> None:
    """mlx-lm's speculative decoding hands the target `prompt_cache[:len(model.layers)]`: that
    must be all of the target's caches."""
    caches = len(make_prompt_cache(model))
    if caches != len(model.layers):
        raise GenerationError(
            f"speculative decoding cannot run this model: it keeps {caches} caches for "
            f"{len(model.layers)} layers (block sharing, layer_repeat > 1), and mlx-lm splits "
            "the cache by len(model.layers); export it (appleslm export) to unroll the blocks"
        )
    if not can_trim_prompt_cache(make_prompt_cache(model)):
        raise GenerationError("speculative decoding needs a model whose KV cache can be trimmed")


@dataclass(frozen=True)
class Draft:
    """A small model that proposes `tokens` tokens a step for mlx-lm's speculative decoding."""

    model: Any
    tokens: int = 3

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise GenerationError(f"--draft-tokens must be at least 1, not {self.tokens}")


@dataclass(frozen=True)
class ProxyArgs:
    """What mlx-lm and appleslm read of a model's args: the vocabulary and the context."""

    vocab_size: int
    max_position_embeddings: int | None
    alpha: float


class ProxyTuned(nn.Module):
    """Proxy-tuning (Liu et al. 2024) as one mlx-lm model: the next-token logits are
    base + alpha * (expert - anti_expert), all three raw logits over the shared vocabulary.

    Each model keeps its own KV cache; `make_cache` returns them end to end and every call hands
    each model its part, so mlx-lm's generation, prompt caches (and their trimming), the chat
    app's cache reuse and speculative decoding see one ordinary model.
    """

    def __init__(
        self, base: nn.Module, expert: nn.Module, anti_expert: nn.Module, alpha: float = 1.0
    ):
        super().__init__()
        self.base, self.expert, self.anti_expert = base, expert, anti_expert
        self._cache_sizes = [len(make_prompt_cache(m)) for m in self.parts]
        probe = mx.array([[0]])
        widths = [m(probe).shape[-1] for m in self.parts]
        contexts = [c for c in map(context_length, self.parts) if c is not None]
        # Vocabularies are padded to different widths; the real tokens are the first ones.
        self.args = ProxyArgs(min(widths), min(contexts) if contexts else None, alpha)

    @property
    def parts(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return self.base, self.expert, self.anti_expert

    @property
    def layers(self) -> list[nn.Module]:
        return [layer for m in self.parts for layer in m.layers]

    def make_cache(self) -> list[Any]:
        return [c for m in self.parts for c in make_prompt_cache(m)]

    def __call__(self, inputs: mx.array, cache: list[Any] | None = None) -> mx.array:
        if cache is None:
            caches = [None] * 3
        else:
            ends = [sum(self._cache_sizes[: i + 1]) for i in range(3)]
            caches = [cache[end - size : end] for end, size in zip(ends, self._cache_sizes)]
        base, expert, anti = (
            m(inputs, cache=c)[..., : self.args.vocab_size].astype(mx.float32)
            for m, c in zip(self.parts, caches)
        )
        return base + self.args.alpha * (expert - anti)


def proxy_tuned(
    base: tuple[nn.Module, Any],
    expert: tuple[nn.Module, Any],
    anti_expert: tuple[nn.Module, Any],
    alpha: float = 1.0,
) -> ProxyTuned:
    """The proxy-tuned composite of three (model, tokenizer) pairs; their vocabularies must be
    the base's."""
    if not math.isfinite(alpha):
        raise GenerationError(f"--alpha must be a finite number, not {alpha}")
    for what, (_, tokenizer) in (("the expert", expert), ("the anti-expert", anti_expert)):
        check_vocabulary(what, base[1], tokenizer)
    composite = ProxyTuned(base[0], expert[0], anti_expert[0], alpha)
    real = len(base[1].get_vocab())
    if composite.args.vocab_size < real:
        raise VocabularyError(
            f"a model of the proxy-tuning has {composite.args.vocab_size:,} logits for a "
            f"{real:,}-token vocabulary"
        )
    return composite


@dataclass(frozen=True)
class ModelChoice:
    """What `generate`, `chat` and `eval` run: a model, optionally proxy-tuned by an
    (expert, anti-expert) pair with strength `alpha`, optionally with a draft model that
    proposes `draft_tokens` tokens a step (speculative decoding)."""

    model: str
    proxy: tuple[str, str] | None = None
    alpha: float = 1.0
    draft: str | None = None
    draft_tokens: int = 3

    def __post_init__(self) -> None:
        if not math.isfinite(self.alpha):
            raise GenerationError(f"--alpha must be a finite number, not {self.alpha}")
        if self.proxy is None and self.alpha != 1.0:
            raise GenerationError("--alpha scales proxy-tuning: give --proxy EXPERT ANTIEXPERT")
        if self.draft_tokens < 1:
            raise GenerationError(f"--draft-tokens must be at least 1, not {self.draft_tokens}")

    def describe(self, name: Callable[[str], str] = str) -> str:
        """E.g. "smollm2 + proxy (shakespeare - sotu, α 1) + draft (draft-tiny, 3 tokens)"."""
        text = name(self.model)
        if self.proxy:
            expert, anti = (name(p) for p in self.proxy)
            text += f" + proxy ({expert} - {anti}, α {self.alpha:g})"
        if self.draft:
            text += f" + draft ({name(self.draft)}, {self.draft_tokens} tokens)"
        return text


def load_choice(
    choice: ModelChoice, *, loader: Callable[..., tuple[Any, Any]] | None = None, **options: Any
) -> tuple[Any, Any, Draft | None]:
    """(model, tokenizer, draft) for `choice`; `loader` (default `load_model`, with `options`)
    loads each model directory."""
    if loader is None:
        from appleslm.io.model_dir import load_model as loader
    model, tokenizer = loader(choice.model, **options)
    if choice.proxy is not None:
        expert, anti = (loader(spec, **options) for spec in choice.proxy)
        model = proxy_tuned((model, tokenizer), expert, anti, choice.alpha)
    draft = None
    if choice.draft is not None:
        draft_model, draft_tokenizer = loader(choice.draft, **options)
        check_vocabulary(f"the draft {choice.draft}", tokenizer, draft_tokenizer)
        check_cache_split(model)
        draft = Draft(draft_model, choice.draft_tokens)
    return model, tokenizer, draft


class ChatSession:
    """A conversation with one model whose KV cache survives from turn to turn.

    Each turn the whole conversation is rendered with the model's chat template (or joined as
    plain text for a base model without one) and tokenized, which is cheap; only the tokens
    after the longest prefix already in the cache are fed to the model. When the history
    changed behind the cache (a regenerated or edited message) the cache is trimmed back to
    the common prefix with `trim_prompt_cache`, so the model never re-reads what it has seen.

    With a `draft` every reply is decoded speculatively; the draft's caches follow the model's
    in one prompt cache (as mlx-lm splits it) and are trimmed with them.

    One reply streams at a time; a lock makes a second caller wait for the first.
    """

    def __init__(
        self, model: Any, tokenizer: Any, *, chat_template: bool = True, draft: Draft | None = None
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.use_chat_template = chat_template
        self.draft = draft
        if draft is not None:
            check_cache_split(model)
        self.context_length = context_length(model)
        self.stats: Stats | None = None
        self._lock = threading.Lock()
        self._cache: list[Any] = self._new_cache()
        self._cached_ids: list[int] = []

    def _new_cache(self) -> list[Any]:
        draft = make_prompt_cache(self.draft.model) if self.draft is not None else []
        return make_prompt_cache(self.model) + draft

    @property
    def chat_mode(self) -> bool:
        """Whether messages go through a chat template; False means plain completion (a base
        model without a template, or a chat model asked for raw completion)."""
        return self.use_chat_template and bool(getattr(self.tokenizer, "has_chat_template", False))

    @property
    def cached_tokens(self) -> int:
        return len(self._cached_ids)

    def reset(self) -> None:
        """Forget the cache (a new conversation shares nothing with the last one)."""
        with self._lock:
            self._reset()

    def _reset(self) -> None:
        self._cache = self._new_cache()
        self._cached_ids = []

    def render(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of the prompt for the next assistant reply to `messages`."""
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        if self.chat_mode:
            return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        text = "".join(m["content"] + ("\n\n" if m["role"] == "system" else "") for m in messages)
        bos = getattr(self.tokenizer, "bos_token", None)
        return list(
            self.tokenizer.encode(text, add_special_tokens=bos is None or not text.startswith(bos))
        )

    def stream(
        self,
        messages: Sequence[Message],
        settings: SamplingSettings,
        *,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[GenerationResponse]:
        """Stream the assistant's reply to `messages` (which end with the user's turn).

        `self.stats` follows every response. Raises `PromptTooLongError` before touching the
        model when the prompt does not fit the context, `OutOfMemoryError` when MLX runs out.
        """
        start = time.perf_counter()
        with self._lock:
            ids = self.render(messages)
            limit = self.context_length
            if limit is not None and len(ids) >= limit:
                raise PromptTooLongError(
                    f"The prompt is {len(ids):,} tokens but the model's context is "
                    f"{limit:,} tokens. Start a new conversation or shorten the messages."
                )
            keep = self._reuse(ids)
            max_tokens = settings.max_tokens
            if limit is not None:
                max_tokens = min(max_tokens, limit - len(ids))
            drafted = 0 if self.draft is not None else None
            self.stats = Stats(cached_tokens=keep, draft_tokens=drafted)
            generated: list[int] = []
            ttft = None
            finished = False
            responses = stream_tokens(
                self.model,
                self.tokenizer,
                ids[keep:],
                settings,
                max_tokens=max_tokens,
                prompt_cache=self._cache,
                should_stop=should_stop,
                draft=self.draft,
            )
            try:
                for response in responses:
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    generated.append(response.token)
                    if drafted is not None:
                        drafted += response.from_draft
                    self.stats = Stats.from_response(
                        response, ttft=ttft, cached_tokens=keep, draft_tokens=drafted
                    )
                    yield response
                finished = True
            except GeneratorExit:  # the caller stopped reading: a normal, early end
                finished = True
                raise
            finally:
                responses.close()
                self._settle(ids + generated, failed=not finished)

    def _reuse(self, ids: list[int]) -> int:
        """Trim the cache to its longest common prefix with `ids`; return that length."""
        keep = 0
        for cached, new in zip(self._cached_ids, ids, strict=False):
            if cached != new:
                break
            keep += 1
        keep = min(keep, len(ids) - 1)  # the model must read at least one token to answer
        if keep < len(self._cached_ids):
            if can_trim_prompt_cache(self._cache):
                trim_prompt_cache(self._cache, len(self._cached_ids) - keep)
                self._cached_ids = self._cached_ids[:keep]
            else:
                self._reset()
                keep = 0
        return keep

    def _settle(self, known_ids: list[int], failed: bool) -> None:
        """Record which tokens the cache now holds, however the stream ended.

        mlx-lm feeds every sampled token back before yielding it, so after a reply the cache
        holds the prompt plus every generated token (the end-of-sequence one included); a
        prompt abandoned mid-prefill leaves only the steps already done. Speculative decoding
        rewinds its caches to what was accepted, and the draft's may end a token short of the
        model's: the longer one is trimmed to the shorter. The caches' own offsets say where
        they end; anything inconsistent (or an error mid-call) starts afresh.
        """
        split = len(self._cache) if self.draft is None else len(self.model.layers)
        parts = [self._cache[:split], self._cache[split:]]
        offsets = [getattr(part[0], "offset", None) for part in parts if part]
        if failed or None in offsets or max(offsets) > len(known_ids):
            self._reset()
            return
        offset = min(offsets)
        for part, end in zip(parts, offsets):
            if end > offset:
                trim_prompt_cache(part, end - offset)
        self._cached_ids = known_ids[:offset]
