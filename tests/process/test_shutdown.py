"""SIGTERM to ``llm-fleet serve`` (vLLM's ``test_shutdown.py``, on our launcher): the
stream in flight finishes within the grace period, a new request is refused with an
OpenAI-shaped 503 and ``Retry-After``, and then no process of the launcher's tree is
left; with a grace of 0 the stream ends at once with an error frame.

Each test starts its own local Ray cluster (``tests/process/drain_run.py``), so this
folder runs apart from the shared fleet: ``make test`` runs it in a second pytest, after
the first one has stopped the fleet (``-m own_cluster``).
"""

from __future__ import annotations

import json

import pytest

from tests.process.drain_run import DrainRun, run_drain
from tests.process.launcher_run import TOKEN_DELAY_S

pytestmark = [pytest.mark.own_cluster, pytest.mark.slow]

# Serve's own stop (proxy, replicas, the local cluster) after the drain: 8 to 9 s here.
STOP_S = 30


def _refused_as_shutting_down(run: DrainRun) -> None:
    new = run.new_request
    assert new.get("status") == 503, new
    assert int(new["retry_after"]) >= 1, new
    error = json.loads(new["body"])["error"]
    assert (error["type"], error["code"]) == ("service_unavailable", "shutting_down"), error
    assert error["request_id"]


def _check_all_gone(run: DrainRun) -> None:
    assert run.exit_code is not None, f"the launcher did not exit (log: {run.log})"
    assert run.left == [], f"processes left after the launcher's exit: {run.left}"


def test_sigterm_lets_the_stream_finish_refuses_new_requests_then_stops_everything() -> None:
    grace_s, tokens = 10.0, 60  # 3 s of tokens: it fits in the grace
    run = run_drain(grace_s, tokens)
    print(f"grace {grace_s} s: {run}")
    assert run.ready, f"not ready (log: {run.log})"
    _refused_as_shutting_down(run)
    stream = run.stream
    assert stream.get("status") == 200, stream
    assert stream["end"].rstrip().endswith("data: [DONE]"), stream
    assert '"error"' not in stream["end"], stream
    assert '"finish_reason":"length"' in stream["end"].replace(" ", ""), stream
    assert stream["took_s"] >= tokens * TOKEN_DELAY_S, stream  # served whole, not cut
    _check_all_gone(run)
    assert run.exit_after_s is not None and run.exit_after_s <= grace_s + STOP_S, run


def test_sigterm_with_no_grace_ends_the_stream_at_once_with_an_error_frame() -> None:
    tokens = 200  # 10 s of tokens: cut short
    run = run_drain(0.0, tokens)
    print(f"grace 0: {run}")
    assert run.ready, f"not ready (log: {run.log})"
    stream = run.stream
    assert stream.get("status") == 200, stream
    assert stream["took_s"] < tokens * TOKEN_DELAY_S, stream
    end = stream["end"]
    assert end.rstrip().endswith("data: [DONE]"), stream
    assert '"code": "shutting_down"' in end or '"code":"shutting_down"' in end, stream
    _check_all_gone(run)
    assert run.exit_after_s is not None and run.exit_after_s <= STOP_S, run
