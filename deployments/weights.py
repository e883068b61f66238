"""Weight sources: turn a model's ``source`` into a local folder vLLM can load.

Forms handled here: ``embedded://<id>`` (converted once into the model store, see
``deployments/embedded.py``) and local folders (``/abs/path`` or ``file:///abs/path``).
``s3://`` and ``hf://`` sources validate in config but are loaded by the weight-store
modules of the air-gapped supply; until those exist a replica fails at start with a
clear error naming the model, and the other models keep serving.
"""

from __future__ import annotations

from pathlib import Path

from deployments import embedded
from deployments.errors import ModelPreparationError

EMBEDDED_SCHEME = "embedded://"


def resolve_weights(source: str) -> Path:
    """Return a local folder holding the weights for ``source``."""
    if source.startswith(EMBEDDED_SCHEME):
        return embedded.prepare(source.removeprefix(EMBEDDED_SCHEME))
    if source.startswith(("file://", "/")):
        folder = Path(source.removeprefix("file://"))
        if not (folder / "config.json").is_file():
            raise ModelPreparationError(f"{folder} holds no model (config.json is missing)")
        return folder
    scheme = source.split("://", 1)[0]
    raise ModelPreparationError(f"{scheme}:// weight sources are not available in this build")
