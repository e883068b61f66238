"""The gateway: the FastAPI ingress in front of every model.

Imported as ``llm_fleet.router`` (``llm_fleet/__init__.py``); imported as ``router``
(the layout before one import root) it stops with the new path.
"""

from llm_fleet import refuse_old_name

refuse_old_name(__name__, "router")
