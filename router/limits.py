"""Per-model output token policy, applied before a request reaches the engine.

- No ``max_tokens`` / ``max_completion_tokens`` sent: ``default_max_tokens`` is used,
  so a client that forgets it cannot hold a replica for the whole context.
- Either one above ``max_tokens_limit``: 400 ``max_tokens_exceeded`` naming the limit.
- Prompt plus ``max_tokens`` over the model's context: checked by the engine with the
  real tokenizer and chat template, answered as 400 ``context_length_exceeded``.
"""

from __future__ import annotations

from typing import Any

from deployments.config import TokenLimits
from deployments.errors import TokenLimitError

_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")


def apply_token_limits(body: dict[str, Any], limits: TokenLimits) -> dict[str, Any]:
    """Return ``body`` with a max_tokens the policy admits, or raise TokenLimitError."""
    requested = {key: body[key] for key in _TOKEN_FIELDS if body.get(key) is not None}
    for key, value in requested.items():
        if value > limits.max_tokens_limit:
            raise TokenLimitError(
                f"{key}={value} exceeds this model's limit of {limits.max_tokens_limit} "
                "output tokens.",
                param=key,
            )
    if requested:
        return body
    return {**body, "max_tokens": limits.default_max_tokens}
