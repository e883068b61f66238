"""Per-model output token policy, applied before a request reaches the engine.

- No ``max_tokens`` (nor, for chat, ``max_completion_tokens``) sent: ``default_max_tokens``
  is used, so a client that forgets it cannot hold a replica for the whole context.
  ``max_completion_tokens`` is a chat field; vLLM's completions ignore it, so there it
  neither counts as a choice nor is checked.
- One above ``max_tokens_limit``: 400 ``max_tokens_exceeded`` naming the limit.
- An API key's own ``max_tokens`` cap (``deployments/keys.py``) lowers both: the lower of
  the model's limit and the key's cap is the limit, and the default is at most the cap.
- Prompt plus ``max_tokens`` over the context: checked in the replica, where the real
  tokenizer and chat template count the prompt (``deployments/vllm_engine.py``; vLLM
  alone would shrink ``max_tokens`` instead). The router answers that 400 with the code
  ``context_length_exceeded``.
"""

from __future__ import annotations

from typing import Any

from deployments.config import TokenLimits
from deployments.engine import Route
from deployments.errors import TokenLimitError

# The fields the engine reads as the output budget, per route (parse_request typed them).
_TOKEN_FIELDS: dict[Route, tuple[str, ...]] = {
    "chat": ("max_tokens", "max_completion_tokens"),
    "completions": ("max_tokens",),
}


def apply_token_limits(
    route: Route, body: dict[str, Any], limits: TokenLimits, key_cap: int | None = None
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
