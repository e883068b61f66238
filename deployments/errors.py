"""The errors of llm-fleet outside a request: a bad config, weights that cannot be
prepared. A request's errors, the ``APIError`` tree, are the router's:
``router/api_errors.py``.

::

    FleetError                       anything this project raises on purpose
    ├── ConfigError                  a config file or env override is invalid (startup)
    ├── ModelPreparationError        weights could not be found, converted or verified
    └── APIError                     a request failed (router/api_errors.py)

An error told in one short line (``/health``'s reasons, weight stores' messages) is
told by :func:`exception_reason`, and a status text by :func:`short_reason`.
"""

from __future__ import annotations

from pydantic import ValidationError

# A reason shown on /health and in error messages stays one short line.
REASON_MAX_CHARS = 500


class FleetError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(FleetError):
    """A config file, its ``args`` or an env override is invalid."""


class ModelPreparationError(FleetError):
    """A model's weights could not be located, converted or verified."""


def short_reason(text: str, *, lines: int | None = 1) -> str:
    """``text`` as one short line: its first ``lines`` non-blank lines (None: all of
    them), stripped and joined by a space, at most ``REASON_MAX_CHARS`` characters;
    "" when it has none."""
    said = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(said[:lines])[:REASON_MAX_CHARS]


def exception_reason(exc: BaseException, *, lines: int | None = 1) -> str:
    """Why ``exc`` happened, in one short line: its type and the first ``lines`` lines
    of its message (see :func:`short_reason`), or its type alone for no message.

    A pydantic ValidationError (vLLM validates its configs with pydantic) gives its
    first error's message: its own first line only names the class that failed.
    """
    if isinstance(exc, ValidationError) and exc.errors():
        message = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
    else:
        message = str(exc)
    said = short_reason(message, lines=lines)
    return (f"{type(exc).__name__}: {said}" if said else type(exc).__name__)[:REASON_MAX_CHARS]
