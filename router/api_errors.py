"""The errors of a request: each carries its HTTP status and the OpenAI error fields.

::

    APIError                         a request failed; carries the HTTP status and the
    │                                OpenAI error fields (type, code, param)
    ├── BadRequestError              400 invalid_request_error
    │   ├── TokenLimitError          400 max_tokens over a limit, or over the context
    │   └── RequestLimitError        400 a field that multiplies work over its cap (n, ...)
    ├── AuthenticationError          401 missing, malformed, unknown or revoked API key
    ├── ModelNotFoundError           404 unknown or not-allowed model (for the config or the key)
    ├── RequestTooLargeError         413 a body over router.max_request_bytes
    ├── UnsupportedMediaTypeError    415 a body that is not declared as JSON
    ├── QuotaExceededError           429 the key's rpm, tpm or concurrency limit is reached
    ├── GatewayBusyError             429 router.max_concurrent_requests in flight gateway-wide
    ├── HeadersTooLargeError         431 request headers over router.max_header_bytes
    ├── InternalServerError          500; its message never reaches the client
    ├── ServiceUnavailableError      503 no replica can take the request now
    │   ├── ModelNotReadyError       503 the model is loading, scaled to zero or failed
    │   └── ReplicaLostError         503 the replica running the request died (node lost)
    └── RequestTimeoutError          504 not answered within router.request_timeout_s

``APIError`` is a ``FleetError`` (``deployments/errors.py``). Code below the routes raises
these; ``router/errors.py`` converts one to an HTTP response and to an SSE frame, in
exactly two functions.
"""

from __future__ import annotations

from typing import Literal

from llm_fleet.deployments.engine import EngineError
from llm_fleet.deployments.errors import FleetError


class APIError(FleetError):
    """A request-level failure with an HTTP status and OpenAI error fields."""

    status_code: int = 500
    error_type: str = "server_error"
    default_code: str | None = None
    # Why the router refused a request before any engine saw it (a metric label):
    # allowlist, limits, bad_request, overload, unavailable, auth or quota.
    rejection: str | None = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        status_code: int | None = None,
        retry_after_s: int = 1,
    ):
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.default_code
        self.param = param
        if status_code is not None:
            self.status_code = status_code
        self.retry_after_s = retry_after_s  # sent as Retry-After with 429 and 503


class BadRequestError(APIError):
    status_code = 400
    error_type = "invalid_request_error"
    rejection = "bad_request"


class TokenLimitError(BadRequestError):
    """``max_tokens`` above the model's hard limit, or prompt + max_tokens over the context."""

    default_code = "max_tokens_exceeded"
    rejection = "limits"


class RequestLimitError(BadRequestError):
    """A field that multiplies the engine's work (n, best_of, logprobs, stop strings,
    messages, tools, prompts) is over the model's cap (``limits`` in its config)."""

    default_code = "request_limit_exceeded"
    rejection = "limits"


class UnsupportedMediaTypeError(APIError):
    status_code = 415
    error_type = "invalid_request_error"
    default_code = "unsupported_media_type"
    rejection = "bad_request"


class HeadersTooLargeError(APIError):
    status_code = 431
    error_type = "invalid_request_error"
    default_code = "request_header_fields_too_large"
    rejection = "limits"


class RequestTooLargeError(APIError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"
    rejection = "limits"


class AuthenticationError(APIError):
    """No valid API key. One message for every cause, so a caller learns nothing about
    which keys exist or were revoked."""

    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"
    rejection = "auth"

    def __init__(self) -> None:
        super().__init__("Invalid or missing API key.")


class ModelNotFoundError(APIError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "model_not_found"
    rejection = "allowlist"

    def __init__(self, model: object):
        shown = model if isinstance(model, str) and len(model) <= 200 else "<invalid>"
        super().__init__(
            f"The model '{shown}' does not exist or you do not have access to it.",
            param="model",
        )


QuotaLimit = Literal["rpm", "tpm", "concurrency"]
_QUOTA_CODES: dict[QuotaLimit, str] = {
    "rpm": "rate_limit_exceeded_rpm",
    "tpm": "rate_limit_exceeded_tpm",
    "concurrency": "concurrency_limit_exceeded",
}


class QuotaExceededError(APIError):
    """The API key reached one of its limits; ``Retry-After`` says when to try again."""

    status_code = 429
    error_type = "rate_limit_error"
    rejection = "quota"

    def __init__(self, limit: QuotaLimit, value: int | None, retry_after_s: int):
        what = {
            "rpm": "requests per minute",
            "tpm": "tokens per minute",
            "concurrency": "concurrent requests",
        }[limit]
        super().__init__(
            f"This API key reached its limit of {value} {what}; retry in {retry_after_s} s.",
            code=_QUOTA_CODES[limit],
            retry_after_s=retry_after_s,
        )
        self.limit = limit


class GatewayBusyError(APIError):
    """The whole gateway has ``router.max_concurrent_requests`` requests in flight."""

    status_code = 429
    error_type = "rate_limit_error"
    default_code = "gateway_busy"
    rejection = "overload"

    def __init__(self, limit: int):
        super().__init__(
            f"The gateway is at its limit of {limit} concurrent requests "
            "(LLM_MAX_CONCURRENT_REQUESTS); retry in 1 s.",
            retry_after_s=1,
        )


class ServiceUnavailableError(APIError):
    status_code = 503
    error_type = "service_unavailable"
    default_code = "service_unavailable"
    rejection: str | None = "overload"


class ShuttingDownError(ServiceUnavailableError):
    """The gateway is draining before a shutdown (``router/drain.py``): a new request is
    refused, or one in flight ran past the drain's end (its generation aborted)."""

    default_code = "shutting_down"
    rejection = "unavailable"

    def __init__(self, retry_after_s: int = 1):
        super().__init__(
            "The gateway is shutting down; retry shortly (another replica or the restarted "
            "gateway will answer).",
            retry_after_s=retry_after_s,
        )


class ModelNotReadyError(ServiceUnavailableError):
    """No replica of the model is ready: loading, scaled to zero, or failed to start."""

    default_code = "model_not_ready"
    rejection = "unavailable"

    def __init__(self, model_id: str, state: str, retry_after_s: int):
        why = {
            "failed": "failed to start; operators: see /health/ready",
            "idle": "is scaled to zero and starting",
        }.get(state, f"is {state}")
        super().__init__(
            f"Model '{model_id}' {why}; retry in {retry_after_s} s.",
            param="model",
            retry_after_s=retry_after_s,
        )


class ReplicaLostError(ServiceUnavailableError):
    """The model replica serving the request died with it: its node was lost, its process
    was killed. The request is lost; a retry goes to a surviving replica (Serve drops the
    dead one from routing within a second and starts a replacement)."""

    default_code = "replica_lost"
    rejection = None  # not a refusal: the request was running

    def __init__(self, model_id: str):
        super().__init__(
            f"The replica of model '{model_id}' serving this request was lost (its node or "
            "process died); retry: another replica will answer.",
            retry_after_s=1,
        )


class RequestTimeoutError(APIError):
    """The request ran past ``router.request_timeout_s``; its generation was aborted."""

    status_code = 504
    error_type = "timeout_error"
    default_code = "request_timeout"

    def __init__(self, timeout_s: float):
        super().__init__(
            f"The request was not answered within {timeout_s:g} s "
            "(router.request_timeout_s); its generation was stopped."
        )


class InternalServerError(APIError):
    status_code = 500
    error_type = "server_error"
    default_code = "internal_error"


def api_error_from_engine(error: EngineError) -> APIError:
    """The APIError for a failed request the engine reported: by its status and code."""
    if 400 <= error.status < 500:
        return BadRequestError(
            error.message, code=error.code, param=error.param, status_code=error.status
        )
    if error.status == 503:
        # e.g. ``engine_dead``: the replica's engine died and Serve is replacing it.
        return ServiceUnavailableError(error.message, code=error.code)
    return InternalServerError(error.message)
