"""The LLM Inference API surface: ``/api/generate``, ``/api/chat``, their ``/stream``
twins and ``/api/llms``, for clients of the older on-premise "LLM Inference API" service.

Each ``/api`` request is translated to an OpenAI request and runs the same pipeline as
``/v1`` (``router/pipeline.py``): keys, allowlist, token limits, quotas, the readiness
gate, metrics, the access line, disconnect aborts and OpenAI-shaped errors with a
request id. Only the bodies differ; that service documented no response shapes, so
these are ours (README, LLM Inference API compatibility):

- request: ``/api/generate`` takes ``prompt`` (a string), ``/api/chat`` takes
  ``messages`` (OpenAI's); both take ``model`` and any OpenAI sampling field
  (``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``...), capped as on
  ``/v1``. ``stream`` is the route's, never the body's.
- ``/api/generate`` on a model with ``generate_route: chat`` (the default: instruct
  models) sends the prompt as one user message, so the model's chat template applies;
  with ``generate_route: completions`` (base models) it continues the raw prompt.
- a whole answer: ``{"id", "model", "created", "text", "finish_reason", "usage"}``, and
  for ``/api/chat`` also ``message`` (``{"role": "assistant", "content"}``).
- a stream: SSE ``data: {"text": "<delta>"}`` frames as tokens arrive, then
  ``data: {"done": true, "id", "model", "finish_reason", "usage"}``, then
  ``data: [DONE]``; an error mid-stream is the OpenAI error frame, then ``[DONE]``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from llm_fleet.deployments.config import ModelConfig
from llm_fleet.deployments.engine import Route
from llm_fleet.router.accounting import RequestRecord
from llm_fleet.router.api_errors import BadRequestError
from llm_fleet.router.model_status import ModelStatus
from llm_fleet.router.sse import DONE_FRAME, UsageTap

Kind = Literal["generate", "chat"]
# Fields the /api route decides, never the body.
_ROUTE_FIELDS = ("stream", "stream_options")


def _frame(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


@dataclass(frozen=True)
class ApiShape:
    """One ``/api`` endpoint: which body it takes and whether it streams."""

    kind: Kind
    stream: bool
    path: str

    @property
    def route(self) -> Route:
        """The engine route before the body is read (``/api/generate`` may pick the
        other once it knows the model)."""
        return "chat"

    def openai_request(
        self, body: Any, model_of: dict[str, ModelConfig]
    ) -> tuple[Route, dict[str, Any]]:
        """The engine route and the OpenAI body for an ``/api`` body (400 if it has no
        ``prompt`` / ``messages`` of the right type). ``model_of`` decides where
        ``/api/generate`` goes; an unknown model goes anywhere: the pipeline's 404 follows."""
        if not isinstance(body, dict):
            raise BadRequestError("The request body must be a JSON object.")
        rest = {k: v for k, v in body.items() if k not in _ROUTE_FIELDS}
        rest["stream"] = self.stream
        if self.stream:
            rest["stream_options"] = {"include_usage": True}  # for the final frame
        if self.kind == "chat":
            return "chat", rest  # messages checked by the pipeline, as on /v1
        prompt = rest.pop("prompt", None)
        if not isinstance(prompt, str):
            missing = prompt is None
            raise BadRequestError(
                "Missing required parameter: 'prompt'."
                if missing
                else "Invalid value for 'prompt': a string.",
                param="prompt",
                code="invalid_value",
            )
        model = model_of.get(str(rest.get("model")))
        if model is not None and model.generate_route == "completions":
            return "completions", {**rest, "prompt": prompt}
        return "chat", {**rest, "messages": [{"role": "user", "content": prompt}]}

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        """A whole OpenAI answer (chat or completion) in this endpoint's shape."""
        choices = body.get("choices") or [{}]
        choice = choices[0]
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else choice.get("text")
        shaped: dict[str, Any] = {
            "id": body.get("id"),
            "model": body.get("model"),
            "created": body.get("created"),
            "text": text or "",
            "finish_reason": choice.get("finish_reason"),
            "usage": body.get("usage"),
        }
        if self.kind == "chat":
            shaped["message"] = {"role": "assistant", "content": text or ""}
        return shaped

    def tap(self) -> ApiStreamTap:
        return ApiStreamTap()


class ApiStreamTap(UsageTap):
    """The relay's usage tap, then each OpenAI chunk in the ``/api`` stream shape.

    The usage chunk, which the translated request always asks for, becomes the final
    ``done`` frame, carrying the finish reason the last content chunk gave."""

    def __init__(self) -> None:
        super().__init__(drop_usage_chunk=False)
        self._finish_reason: str | None = None

    def frame(self, frame: str, record: RequestRecord) -> str | None:
        relayed = super().frame(frame, record)
        if relayed is None or relayed == DONE_FRAME:
            return relayed
        try:
            chunk = json.loads(relayed.removeprefix("data: "))
        except ValueError:
            return relayed  # not a JSON event: relayed as it is
        if not isinstance(chunk, dict) or "error" in chunk:
            return relayed  # the OpenAI error frame, as on /v1
        choices = chunk.get("choices") or []
        if not choices:
            usage = chunk.get("usage")
            if usage is None:
                return None
            done = {"done": True, "id": chunk.get("id"), "model": chunk.get("model")}
            return _frame({**done, "finish_reason": self._finish_reason, "usage": usage})
        choice = choices[0]
        if choice.get("finish_reason") is not None:
            self._finish_reason = choice["finish_reason"]
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        return _frame({"text": text}) if text else None


def llm_list(
    models: Mapping[str, ModelConfig], statuses: Mapping[str, ModelStatus]
) -> dict[str, Any]:
    """``GET /api/llms``: the models the caller may use, each with its state and
    replicas (as ``/health/ready`` shows them; None where the gateway has no status
    board, as in a unit test's app)."""
    listed = []
    for model_id, model in models.items():
        status = statuses.get(model_id)
        listed.append(
            {
                "id": model_id,
                "state": status.state if status is not None else None,
                "replicas": {
                    "running": status.running,
                    "starting": status.starting,
                    "min": status.min_replicas,
                    "max": status.max_replicas,
                }
                if status is not None
                else None,
                "generate_route": model.generate_route,
                "max_tokens_limit": model.limits.max_tokens_limit,
                # What a request that sends none gets (null: the engine's own default).
                "defaults": {
                    "temperature": model.sampling.temperature,
                    "top_p": model.sampling.top_p,
                    "max_tokens": model.limits.default_max_tokens,
                },
            }
        )
    return {"models": listed}


API_SHAPES: dict[str, ApiShape] = {
    shape.path: shape
    for shape in (
        ApiShape("generate", False, "/api/generate"),
        ApiShape("generate", True, "/api/generate/stream"),
        ApiShape("chat", False, "/api/chat"),
        ApiShape("chat", True, "/api/chat/stream"),
    )
}
