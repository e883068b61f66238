"""Traces over OTLP on the real Serve stack: ``llm-fleet serve`` with
``OTEL_EXPORTER_OTLP_ENDPOINT`` set starts replicas that inherit it, and each request
through Serve's proxy and the router arrives at a real OTLP receiver on loopback
(``tests/otlp_receiver.py``) as a span of the caller's trace (``traceparent`` passes
through the proxy), named by ``SERVICE_NAME``, with no prompt text in the bytes."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.otlp_receiver import GrpcReceiver, ReceivedSpan
from tests.process.launcher_run import fake_fleet_config, launched, wait_ready

pytestmark = [pytest.mark.own_cluster, pytest.mark.slow]

PORT = 8126
URL = f"http://127.0.0.1:{PORT}"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
MARKER = "zebra-quartz"


def _by_route(spans: list[ReceivedSpan]) -> dict[str, list[ReceivedSpan]]:
    """The requests' spans (their children have no route), by route."""
    routes: dict[str, list[ReceivedSpan]] = {}
    for span in spans:
        if "http.route" in span.attributes:
            routes.setdefault(span.attributes["http.route"], []).append(span)
    return routes


def test_requests_through_serve_arrive_as_spans_of_the_callers_trace() -> None:
    with GrpcReceiver() as receiver:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "SERVICE_NAME": "fleet-under-test",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
        }
        with launched(fake_fleet_config(PORT), grace_s=0, env=env) as launcher:
            assert wait_ready(launcher, f"{URL}/health/ready", 300), launcher.log.read_text()
            traceparent = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
            chat = {"model": "m", "messages": [{"role": "user", "content": MARKER}]}
            assert httpx.post(
                f"{URL}/v1/chat/completions", json=chat, headers=traceparent, timeout=60
            ).is_success
            assert httpx.post(
                f"{URL}/api/generate", json={"model": "m", "prompt": MARKER}, timeout=60
            ).is_success
            missing = httpx.post(f"{URL}/v1/chat/completions", json={**chat, "model": "x"})
            assert missing.status_code == 404
            deadline = time.monotonic() + 30
            routes = _by_route(receiver.received.spans())
            while time.monotonic() < deadline and [
                len(routes.get(r, [])) for r in ("/v1/chat/completions", "/api/generate")
            ] != [2, 1]:
                time.sleep(0.5)
                routes = _by_route(receiver.received.spans())
    chat_spans = routes.get("/v1/chat/completions", [])
    assert len(chat_spans) == 2, [s.attributes for s in chat_spans]
    served = next(s for s in chat_spans if s.attributes["http.response.status_code"] == 200)
    refused = next(s for s in chat_spans if s.attributes["http.response.status_code"] == 404)
    assert served.span.trace_id.hex() == TRACE_ID
    assert served.span.parent_span_id.hex() == PARENT_ID
    assert served.resource["service.name"] == "fleet-under-test"
    assert served.attributes["gen_ai.request.model"] == "m"
    assert served.attributes["gen_ai.usage.output_tokens"] > 0
    assert refused.span.status.code == 2  # ERROR
    (generate,) = routes["/api/generate"]
    assert generate.attributes["http.response.status_code"] == 200
    assert MARKER.encode() not in receiver.received.raw()
