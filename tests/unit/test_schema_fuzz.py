"""schemathesis on the app in process (the fake engine behind the real router and
replica code): no generated request gets a server error, every refusal is OpenAI-shaped.
The live gateway gets the same in ``tests/serve/test_schema_fuzz.py``."""

from __future__ import annotations

import schemathesis
from fastapi.testclient import TestClient

from tests.fakes import CHAT_MODEL, make_fleet
from tests.schema_fuzz import fuzz, sender


def test_no_generated_request_gets_a_server_error() -> None:
    app = make_fleet().app
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    with TestClient(app, raise_server_exceptions=False) as http:
        seen = fuzz(schema, sender(http, "http://testserver"), model=CHAT_MODEL, max_examples=40)
    print(seen)
    chat = seen["POST /v1/chat/completions"]
    assert chat.get(200, 0) > 0 and chat.get(400, 0) > 0, seen  # both kinds were sent
