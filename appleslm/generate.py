"""Generation, thin over mlx-lm: sampling settings, a multi-turn chat session with a reused KV
cache, live statistics, and a plain text stream for the CLI.

Everything that decides tokens is mlx-lm's (`stream_generate`, `make_sampler`,
`make_logits_processors`, `make_prompt_cache`, `trim_prompt_cache`); this module only chooses
what to feed it. The chat UI (`tui/`) and `appleslm generate` both sit on top of it.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
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
    """

    ttft: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory: float = 0.0
    finish_reason: str | None = None

    @classmethod
    def from_response(
        cls, response: GenerationResponse, *, ttft: float, cached_tokens: int = 0
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
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Stats:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def summary(self) -> str:
        """One line for a footer or a log: the same figures mlx-lm's chat prints."""
        return (
            f"TTFT {self.ttft:.2f}s · prompt {self.prompt_tps:.1f} tok/s · "
            f"gen {self.generation_tps:.1f} tok/s · {self.generation_tokens} tok · "
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
) -> Iterator[GenerationResponse]:
    """mlx-lm's `stream_generate` with `settings` applied, a stop check and clear errors.

    `should_stop` is polled between prefill steps and between tokens; when it answers True the
    stream ends (a prompt still being prefilled is abandoned, a reply keeps what it has).
    Peak memory is reset first, so `peak_memory` describes this reply alone.
    """
    stop = should_stop or (lambda: False)

    def on_progress(done: int, total: int) -> None:
        if done < total and stop():
            raise _Stopped

    if settings.seed is not None:
        mx.random.seed(settings.seed)
    mx.reset_peak_memory()
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


class ChatSession:
    """A conversation with one model whose KV cache survives from turn to turn.

    Each turn the whole conversation is rendered with the model's chat template (or joined as
    plain text for a base model without one) and tokenized, which is cheap; only the tokens
    after the longest prefix already in the cache are fed to the model. When the history
    changed behind the cache (a regenerated or edited message) the cache is trimmed back to
    the common prefix with `trim_prompt_cache`, so the model never re-reads what it has seen.

    One reply streams at a time; a lock makes a second caller wait for the first.
    """

    def __init__(self, model: Any, tokenizer: Any, *, chat_template: bool = True) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.use_chat_template = chat_template
        self.context_length = context_length(model)
        self.stats: Stats | None = None
        self._lock = threading.Lock()
        self._cache: list[Any] = make_prompt_cache(model)
        self._cached_ids: list[int] = []

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
        self._cache = make_prompt_cache(self.model)
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
            self.stats = Stats(cached_tokens=keep)
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
            )
            try:
                for response in responses:
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    generated.append(response.token)
                    self.stats = Stats.from_response(response, ttft=ttft, cached_tokens=keep)
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
        prompt abandoned mid-prefill leaves only the steps already done. The cache's own
        offset says which; anything inconsistent (or an error mid-call) starts afresh.
        """
        offset = getattr(self._cache[0], "offset", None) if self._cache else None
        if failed or offset is None or offset > len(known_ids):
            self._reset()
        else:
            self._cached_ids = known_ids[:offset]
