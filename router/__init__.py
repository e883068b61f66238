"""The gateway: the FastAPI ingress in front of every model.

Imported as ``llm_fleet.router`` (``llm_fleet/__init__.py``); imported as ``router``
(the layout before one import root) it stops with the new path.
"""

if __name__ == "router":
    raise ImportError(
        "llm-fleet's router package is now llm_fleet.router: import that; "
        "in Serve configs, import_path: llm_fleet.router.builder:build_app "
        "(direct paths: llm_fleet.router.builder:build_direct_app)"
    )
