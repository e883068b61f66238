"""Our loggers inside Ray Serve replicas.

In a replica only Ray's loggers have handlers; ours would fall to Python's
WARNING-only last resort. Sending them through Ray Serve's handlers puts them in the
replica's log file (``logs/serve/replica_<app>_<deployment>_<id>.log``) with the
replica's context, in the app's ``logging_config`` encoding: ``TEXT`` by default,
``JSON`` (one object per line; ``extra`` fields become keys) when the app sets it.
"""

from __future__ import annotations

import logging


def log_through_serve(*names: str, level: int = logging.INFO) -> None:
    """Send the loggers ``names`` (and their children) to Ray Serve's handlers.

    Outside a replica Serve's logger has no handlers: logging is left as the process
    set it up (a script, a test run).
    """
    serve_handlers = list(logging.getLogger("ray.serve").handlers)
    if not serve_handlers:
        return
    for name in names:
        ours = logging.getLogger(name)
        ours.setLevel(level)
        ours.handlers = serve_handlers
        ours.propagate = False
