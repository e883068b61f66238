"""A deterministic ``LLMEngine`` for tests: no model, no vLLM, the same contract.

Whitespace-separated words are tokens. The answer echoes the last user message (or
the completion prompt) word by word and then stops; with ``ignore_eos`` (a vLLM
sampling parameter) it repeats those words until the token budget is spent, as a
real model does. Its budget rules are those of ``deployments/vllm_engine.py``, so the
fake cannot drift from the real engine on what ``tests/contract`` checks:

- chat without ``max_tokens`` / ``max_completion_tokens`` may use the whole room left
  in the context; a completion without ``max_tokens`` gets vLLM's default of 16;
- prompt + a requested ``max_tokens`` over the context is refused with a 400 naming
  the context length (vLLM alone would shrink ``max_tokens``; our engine refuses);
- a prompt that alone fills the context is refused the same way.

A request whose ``model`` is a loaded adapter (``load_adapter``) answers in upper case,
so a test can tell the adapter's answer from the base model's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_fleet.deployments.config import ModelConfig
from llm_fleet.deployments.engine import (
    CONTEXT_LENGTH_EXCEEDED,
    AdapterLoadError,
    EngineDeadError,
    EngineInfo,
    Reply,
    Route,
    error_reply,
)

COMPLETION_DEFAULT_MAX_TOKENS = 16  # vLLM's CompletionRequest.max_tokens default
_FALLBACK_ANSWER = ["ok"]


@dataclass(frozen=True)
class _Plan:
    prompt_tokens: int
    tokens: list[str]
    finish_reason: str
    stream: bool
    include_usage: bool


def _error(message: str, param: str | None, code: str | None = None) -> Reply:
    return error_reply(400, message, error_type="BadRequestError", param=param, code=code)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _prompt_words(route: Route, body: dict[str, Any]) -> tuple[int, list[str]] | Reply:
    """(prompt token count, words to echo), or a 400 for a body the fake cannot read."""
    if route == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error("messages must be a non-empty list", "messages")
        texts = [_text_of(m.get("content")) if isinstance(m, dict) else "" for m in messages]
        roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
        user = [t for role, t in zip(roles, texts, strict=True) if role == "user"]
        return sum(len(t.split()) for t in texts), (user[-1].split() if user else [])
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return len(prompt.split()), prompt.split()
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return len(prompt), [str(t) for t in prompt]
    return _error("FakeEngine serves one prompt (text or token ids) per request", "prompt")


class FakeEngine:
    """An ``LLMEngine`` that echoes words; see the module docstring for its rules."""

    def __init__(
        self,
        model_id: str = "fake-model",
        *,
        max_model_len: int = 2048,
        token_delay_s: float = 0.01,
    ) -> None:
        self.model_id = model_id
        self.max_model_len = max_model_len
        self.token_delay_s = token_delay_s
        self._unfinished = 0
        self.bodies: list[dict[str, Any]] = []  # every request body it got, in order
        self._started = False
        self._dead = False
        self.adapters: dict[str, Path] = {}  # loaded, by id
        self.adapter_loads: list[str] = []  # every load, in order

    @classmethod
    def from_config(cls, model: ModelConfig, path: Path) -> FakeEngine:
        """An ``EngineFactory`` for ``ModelDeployment``: the fake in place of vLLM."""
        return cls(model.id, max_model_len=int(model.engine_args.get("max_model_len", 2048)))

    async def start(self) -> EngineInfo:
        self._started = True
        return EngineInfo(model_id=self.model_id, max_model_len=self.max_model_len)

    def _plan(self, route: Route, body: dict[str, Any]) -> _Plan | Reply:
        read = _prompt_words(route, body)
        if isinstance(read, Reply):
            return read
        prompt_tokens, words = read
        room = self.max_model_len - prompt_tokens
        if room < 1:
            return _error(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"your prompt contains {prompt_tokens} input tokens, which exceeds this limit "
                "even without any output tokens. Please reduce the length of the input prompt.",
                "input_tokens",
                CONTEXT_LENGTH_EXCEEDED,
            )
        if body.get("n") not in (None, 1):
            return _error("FakeEngine supports n=1 only", "n")
        param = "max_tokens"
        if route == "chat" and body.get("max_completion_tokens") is not None:
            param = "max_completion_tokens"
        requested = body.get(param)
        if requested is None:
            requested = room if route == "chat" else COMPLETION_DEFAULT_MAX_TOKENS
        if not isinstance(requested, int) or isinstance(requested, bool) or requested < 1:
            return _error(f"{param} must be at least 1, got {requested!r}.", param)
        if requested > room:
            return _error(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {prompt_tokens + requested} tokens ({prompt_tokens} in the "
                f"prompt, {requested} in the completion). Please reduce the length of the "
                "prompt or max_tokens.",
                "max_tokens",
                CONTEXT_LENGTH_EXCEEDED,
            )
        budget = requested
        words = words or _FALLBACK_ANSWER
        if body.get("ignore_eos") is True:
            tokens, finish = [words[i % len(words)] for i in range(budget)], "length"
        else:
            tokens, finish = words[:budget], "length" if len(words) > budget else "stop"
        options = body.get("stream_options")
        return _Plan(
            prompt_tokens=prompt_tokens,
            tokens=tokens,
            finish_reason=finish,
            stream=body.get("stream") is True,
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        )

    async def generate(
        self, route: Route, body: dict[str, Any], request_id: str
    ) -> AsyncGenerator[str | Reply, None]:
        if self._dead:
            raise EngineDeadError(f"fake engine of {self.model_id} died")
        self.bodies.append(body)
        plan = self._plan(route, body)
        if isinstance(plan, Reply):
            yield plan
            return
        if body.get("model") in self.adapters:
            plan = dataclasses.replace(plan, tokens=[t.upper() for t in plan.tokens])
        chat = route == "chat"
        head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{request_id}",
            "object": ("chat.completion.chunk" if plan.stream else "chat.completion")
            if chat
            else "text_completion",
            "created": int(time.time()),
            "model": self.model_id,
        }
        usage = {
            "prompt_tokens": plan.prompt_tokens,
            "completion_tokens": len(plan.tokens),
            "total_tokens": plan.prompt_tokens + len(plan.tokens),
        }

        def frame(choices: list[dict[str, Any]], **extra: Any) -> str:
            return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

        def choice(text: str, finish: str | None, *, role: bool = False) -> dict[str, Any]:
            if not chat:
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            said = {"role": "assistant", "content": text} if role else {"content": text}
            key = "delta" if plan.stream else "message"
            return {"index": 0, key: said, "logprobs": None, "finish_reason": finish}

        # Counted like vLLM counts a request: from admission until its last token.
        self._unfinished += 1
        try:
            if plan.stream and chat:
                yield frame([choice("", None, role=True)])
            for i, token in enumerate(plan.tokens):
                await asyncio.sleep(self.token_delay_s)
                if plan.stream:
                    last = i == len(plan.tokens) - 1
                    text = token if i == 0 else f" {token}"
                    yield frame([choice(text, plan.finish_reason if last else None)])
        finally:
            self._unfinished -= 1
        if plan.stream:
            if plan.include_usage:
                yield frame([], usage=usage)
            yield "data: [DONE]\n\n"
            return
        whole = choice(" ".join(plan.tokens), plan.finish_reason, role=True)
        yield Reply(status=200, body={**head, "choices": [whole], "usage": usage})

    async def load_adapter(self, adapter_id: str, path: Path) -> None:
        if not (path / "adapter_config.json").is_file():
            raise AdapterLoadError(f"adapter {adapter_id!r}: no adapter_config.json in {path}")
        self.adapters[adapter_id] = path
        self.adapter_loads.append(adapter_id)

    async def unload_adapter(self, adapter_id: str) -> None:
        self.adapters.pop(adapter_id, None)

    def die(self) -> None:
        """The engine dies, its process alive (vLLM's engine core gone): ``generate``
        raises ``EngineDeadError`` and ``check_health`` fails from now on."""
        self._dead = True

    async def check_health(self) -> None:
        if self._dead:
            raise RuntimeError("FakeEngine died")
        if not self._started:
            raise RuntimeError("FakeEngine not started (or shut down)")

    async def num_unfinished_requests(self) -> int:
        return self._unfinished

    async def shutdown(self) -> None:
        self._started = False
