"""The model side: config, model replicas, engines, weights and tooling.

Imported as ``llm_fleet.deployments`` (``llm_fleet/__init__.py``); imported as ``deployments``
(the layout before one import root) it stops with the new path.
"""

if __name__ == "deployments":
    raise ImportError(
        "llm-fleet's deployments package is now llm_fleet.deployments: import that; "
        "in Serve configs, import_path: llm_fleet.router.builder:build_app "
        "(direct paths: llm_fleet.router.builder:build_direct_app)"
    )
