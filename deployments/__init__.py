"""The model side: config, model replicas, engines, weights and tooling.

Imported as ``llm_fleet.deployments`` (``llm_fleet/__init__.py``); imported as ``deployments``
(the layout before one import root) it stops with the new path.
"""

from llm_fleet import refuse_old_name

refuse_old_name(__name__, "deployments")
