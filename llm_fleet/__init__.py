"""llm-fleet: production multi-model LLM serving on Ray Serve and vLLM.

One import root. ``llm_fleet.router`` is the gateway (the FastAPI ingress) and
``llm_fleet.deployments`` the model side. In the source tree they are the top-level
folders ``router/`` and ``deployments/``, reached here through symbolic links; a wheel
installs them as ``llm_fleet/router`` and ``llm_fleet/deployments``. Serve configs name
``import_path: llm_fleet.router.builder:build_app``.
"""
