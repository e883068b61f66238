"""What a node reads from its own environment: where weights live on it, and its mirror.

The weight cache (``LLM_FLEET_WEIGHT_CACHE``), the embedded models' store
(``LLM_FLEET_MODEL_STORE``) and the HF mirror (``HF_ENDPOINT``, ``HF_HUB_OFFLINE``)
are read here, by the process that needs them on its node, when it needs them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def node_setting(name: str, environ: Mapping[str, str] | None = None) -> str:
    """This node's value of the environment variable ``name``, stripped ("" if unset).

    Decided on purpose: the node-local settings (the weight cache, the embedded model
    store, the HF mirror's endpoint and offline switch) are read by the process on each
    node, through this function, and not once in the builder: a multi-node cluster may
    place its cache on a different disk, or reach a different mirror, per node, and a
    replica reads them where it runs. The fleet-wide settings (``LLM_ALLOWED_MODELS``,
    the token limits, CORS origins, the keys file) are read once, in the builder
    (``deployments/builder.py``: ``load_config``), and reach replicas as config objects.
    """
    env = os.environ if environ is None else environ
    return env.get(name, "").strip()


def node_dir(name: str, default: str, environ: Mapping[str, str] | None = None) -> Path:
    """The folder ``$name`` names on this node (``~`` expanded), else ``~/.cache/<default>``
    (see :func:`node_setting` for why each node reads its own)."""
    return Path(node_setting(name, environ) or Path("~/.cache") / default).expanduser()
