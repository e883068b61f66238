"""schemathesis on the app in process (the fake engine behind the real router and
replica code): no generated request gets a server error, every refusal is OpenAI-shaped.
The live gateway gets the same in ``tests/serve/test_schema_fuzz.py``."""

from __future__ import annotations

from typing import Any

import schemathesis
from fastapi.testclient import TestClient

from tests.fakes import CHAT_MODEL, make_fleet
from tests.schema_fuzz import fuzz


def test_no_generated_request_gets_a_server_error() -> None:
    app = make_fleet().app
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    with TestClient(app, raise_server_exceptions=False) as http:

        def send(case: schemathesis.Case) -> tuple[int, Any, Any]:
            kwargs = case.as_transport_kwargs(base_url="http://testserver")
            kwargs.pop("cookies", None)  # none in this API; per-request cookies are deprecated
            response = http.request(**kwargs)
            try:
                body = response.json()
            except ValueError:
                body = response.text
            return response.status_code, response.headers, body

        seen = fuzz(schema, send, model=CHAT_MODEL, max_examples=40)
    print(seen)
    chat = seen["POST /v1/chat/completions"]
    assert chat.get(200, 0) > 0 and chat.get(400, 0) > 0, seen  # both kinds were sent
