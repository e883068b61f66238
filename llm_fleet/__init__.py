"""llm-fleet: production multi-model LLM serving on Ray Serve and vLLM.

One import root. ``llm_fleet.router`` is the gateway (the FastAPI ingress) and
``llm_fleet.deployments`` the model side. In the source tree they are the top-level
folders ``router/`` and ``deployments/``, reached here through symbolic links; a wheel
installs them as ``llm_fleet/router`` and ``llm_fleet/deployments``. Serve configs name
``import_path: llm_fleet.router.builder:build_app``.
"""


def refuse_old_name(module_name: str, package: str) -> None:
    """Stop a package imported under its name from before the one import root
    (``router``, ``deployments``), naming the new path; called by both packages."""
    if module_name == package:
        raise ImportError(
            f"llm-fleet's {package} package is now llm_fleet.{package}: import that; "
            "in Serve configs, import_path: llm_fleet.router.builder:build_app "
            "(direct paths: llm_fleet.router.builder:build_direct_app)"
        )
