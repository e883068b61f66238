"""The errors of llm-fleet outside a request: a bad config, weights that cannot be
prepared. A request's errors, the ``APIError`` tree, are the router's:
``router/api_errors.py``.

::

    FleetError                       anything this project raises on purpose
    ├── ConfigError                  a config file or env override is invalid (startup)
    ├── ModelPreparationError        weights could not be found, converted or verified
    └── APIError                     a request failed (router/api_errors.py)
"""

from __future__ import annotations


class FleetError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(FleetError):
    """A config file, its ``args`` or an env override is invalid."""


class ModelPreparationError(FleetError):
    """A model's weights could not be located, converted or verified."""
