"""Per-model request limits, applied before a request reaches the engine.

The fields that multiply the work (``check_request_limits``): ``n`` and ``best_of``
(``limits.max_n``), ``top_logprobs`` / completions' ``logprobs`` (``max_logprobs``),
stop strings (``max_stop_sequences``, each at most ``max_stop_length`` characters),
chat ``messages`` (``max_messages``) and ``tools`` (``max_tools``), and a completions
batch of prompts (``max_prompts``). Over a cap is a 400 ``request_limit_exceeded``
naming the field and the limit. A value of the wrong type is left to vLLM's own 400.

The output token policy (``apply_token_limits``):

- No ``max_tokens`` (nor, for chat, ``max_completion_tokens``) sent: ``default_max_tokens``
  is used, so a client that forgets it cannot hold a replica for the whole context.
  ``max_completion_tokens`` is a chat field; vLLM's completions ignore it, so there it
  neither counts as a choice nor is checked.
- One above ``max_tokens_limit``: 400 ``max_tokens_exceeded`` naming the limit.
- An API key's own ``max_tokens`` cap (``router/keys_file.py``) lowers both: the lower of
  the model's limit and the key's cap is the limit, and the default is at most the cap.
- Prompt plus ``max_tokens`` over the context: checked in the replica, where the real
  tokenizer and chat template count the prompt (``deployments/vllm_engine.py``; vLLM
  alone would shrink ``max_tokens`` instead). The router answers that 400 with the code
  ``context_length_exceeded``.
"""

from __future__ import annotations

from typing import Any

from llm_fleet.deployments.config import RequestLimits
from llm_fleet.deployments.engine import Route
from llm_fleet.router.api_errors import RequestLimitError, TokenLimitError

# The fields the engine reads as the output budget, per route (parse_request typed them).
_TOKEN_FIELDS: dict[Route, tuple[str, ...]] = {
    "chat": ("max_tokens", "max_completion_tokens"),
    "completions": ("max_tokens",),
}


def apply_token_limits(
    route: Route, body: dict[str, Any], limits: RequestLimits, key_cap: int | None = None
) -> dict[str, Any]:
    """Return ``body`` with a max_tokens the policy admits, or raise TokenLimitError."""
    limit, whose = limits.max_tokens_limit, "this model's"
    if key_cap is not None and key_cap < limit:
        limit, whose = key_cap, "this API key's"
    requested = {key: body[key] for key in _TOKEN_FIELDS[route] if body.get(key) is not None}
    for key, value in requested.items():
        if value > limit:
            raise TokenLimitError(
                f"{key}={value} exceeds {whose} limit of {limit} output tokens.", param=key
            )
    if requested:
        return body
    return {**body, "max_tokens": min(limits.default_max_tokens, limit)}


def output_budget(route: Route, body: dict[str, Any]) -> int:
    """The output tokens ``body`` may use, once ``apply_token_limits`` has set them."""
    values = [body[key] for key in _TOKEN_FIELDS[route] if body.get(key) is not None]
    return min(values) if values else 0


def _over(
    field: str, value: int, limit: int, setting: str, noun: str | None = None
) -> RequestLimitError:
    said = f"{value} {noun} exceed" if noun else f"{field}={value} exceeds"
    return RequestLimitError(
        f"{said} this model's limit of {limit} (limits.{setting}).", param=field
    )


def _count(value: Any) -> int | None:
    """An int field's value (None if absent or not an int; a bool is not a count)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def check_request_limits(route: Route, body: dict[str, Any], limits: RequestLimits) -> None:
    """Raise RequestLimitError if a field that multiplies work is over its cap."""
    for field in ("n", "best_of"):
        if (value := _count(body.get(field))) is not None and value > limits.max_n:
            raise _over(field, value, limits.max_n, "max_n")
    logprobs_field = "top_logprobs" if route == "chat" else "logprobs"
    value = _count(body.get(logprobs_field))
    if value is not None and value > limits.max_logprobs:
        raise _over(logprobs_field, value, limits.max_logprobs, "max_logprobs")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    if len(stops) > limits.max_stop_sequences:
        limit = limits.max_stop_sequences
        raise _over("stop", len(stops), limit, "max_stop_sequences", "stop strings")
    longest = max((len(s) for s in stops if isinstance(s, str)), default=0)
    if longest > limits.max_stop_length:
        raise RequestLimitError(
            f"A stop string of {longest} characters exceeds this model's limit of "
            f"{limits.max_stop_length} (limits.max_stop_length).",
            param="stop",
        )
    if route == "chat":
        for field, setting in (("messages", "max_messages"), ("tools", "max_tools")):
            items = body.get(field)
            limit = getattr(limits, setting)
            if isinstance(items, list) and len(items) > limit:
                raise _over(field, len(items), limit, setting, field)
        return
    prompt = body.get("prompt")
    prompts: list[Any] = []  # a batch: a list of strings or of token id lists
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompts = prompt
    if len(prompts) > limits.max_prompts:
        raise _over("prompt", len(prompts), limits.max_prompts, "max_prompts", "prompts")
