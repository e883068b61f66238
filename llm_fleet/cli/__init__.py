"""The product's tooling: the ``llm-fleet`` command (``main.py``) and the launcher that
runs ``serve run`` in the foreground and stops it cleanly (``launcher.py``).

It sits above both sides: it reads configs with ``llm_fleet.deployments``, prepares
weights, and edits the router's API keys file (``llm_fleet.router.keys_file``).
"""
