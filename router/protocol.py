"""What the router itself checks of a request before routing it: the body is JSON
(:func:`read_json`), and its OpenAI fields (:func:`parse_request`).

Only what routing and limits need: the model name, the stream flags, the token
fields, the presence of ``messages`` / ``prompt``, and each message's ``role`` (one of
OpenAI's: vLLM would pass any other to the chat template). Everything else (sampling
parameters, tools, response_format, ...) is validated by vLLM inside the replica,
which answers 400 in the same error shape.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi import Request
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from llm_fleet.router.api_errors import (
    BadRequestError,
    RequestTooLargeError,
    UnsupportedMediaTypeError,
)


def _is_json(content_type: str | None) -> bool:
    """A body's declared type is JSON (``application/json``, any ``+json``), or none is
    declared (clients that send none mean JSON; there is nothing else to mean)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return not media or media == "application/json" or media.endswith("+json")


async def read_json(request: Request, max_bytes: int) -> Any:
    """The body as JSON. Another declared Content-Type is a 415, before the body is read:
    a form or text body is not guessed at (``curl -d`` without ``-H 'Content-Type:
    application/json'`` sends a form). Over ``max_bytes``: 413, declared or read."""
    if not _is_json(request.headers.get("content-type")):
        raise UnsupportedMediaTypeError(
            "The request body must be JSON: send it with 'Content-Type: application/json'."
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise RequestTooLargeError(f"Request body exceeds {max_bytes} bytes.")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > max_bytes:
            raise RequestTooLargeError(f"Request body exceeds {max_bytes} bytes.")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequestError(
            f"The request body is not valid JSON: {exc}", code="invalid_json"
        ) from None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool | None = None


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)


class ChatRequest(_OpenAIRequest):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)


_PROMPT: TypeAdapter[str | list[str] | list[int] | list[list[int]]] = TypeAdapter(
    StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
)


class CompletionRequest(_OpenAIRequest):
    # Checked in a validator: the errors of a union field name its branches
    # ("prompt.str", "prompt.list[int]"), and the client must see "prompt".
    prompt: Any

    @field_validator("prompt")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        try:
            return _PROMPT.validate_python(value)
        except ValidationError:
            raise ValueError(
                "expected a string, a list of strings, a list of token ids "
                "or a list of lists of token ids"
            ) from None


ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def _check_roles(messages: list[dict[str, Any]]) -> None:
    supported = ", ".join(f"'{role}'" for role in ROLES)
    for index, message in enumerate(messages):
        role, param = message.get("role"), f"messages[{index}].role"
        if role in ROLES:
            continue
        if "role" not in message:
            message_text = f"Missing required parameter: '{param}'."
        else:
            shown = repr(role) if isinstance(role, str) and len(role) <= 40 else "<invalid>"
            message_text = f"Invalid value for '{param}': {shown}. Supported: {supported}."
        raise BadRequestError(message_text, param=param, code="invalid_value")


def parse_request(route: Literal["chat", "completions"], body: Any) -> _OpenAIRequest:
    """Validate the routing fields of ``body``; a problem is a 400 naming the field."""
    if not isinstance(body, dict):
        raise BadRequestError("The request body must be a JSON object.")
    model_cls = ChatRequest if route == "chat" else CompletionRequest
    try:
        parsed = model_cls.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        if first["type"] == "missing":
            message = f"Missing required parameter: '{param}'."
        else:
            message = f"Invalid value for '{param}': {first['msg']}."
        raise BadRequestError(message, param=param, code="invalid_value") from None
    if isinstance(parsed, ChatRequest):
        _check_roles(parsed.messages)
    return parsed
