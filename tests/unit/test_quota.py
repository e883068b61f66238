"""Per-key limits: LocalLimits' sliding windows, and the 429s the router answers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from starlette.types import Message

from deployments.keys import create_key
from router.auth import KeyLimits, KeyRing, Principal
from router.quota import Admission, LocalLimits
from tests.fakes import (
    COMPLETIONS_MODEL,
    FakeStatusSource,
    Fleet,
    RecordingMetrics,
    make_fleet,
    post_scope,
    post_then_leave,
)
from tests.unit.ops_helpers import CHAT_PATH, COMPLETIONS_PATH, chat, openai_error, sse_payloads


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def principal(key_id: str = "0000000a", **limits: int) -> Principal:
    return Principal(name=key_id, id=key_id, models=None, limits=KeyLimits(**limits))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# --- LocalLimits --------------------------------------------------------------------


def test_rpm_counts_admitted_requests_over_a_sliding_minute() -> None:
    clock, key = FakeClock(), principal(rpm=2)
    limits = LocalLimits(clock)

    async def scenario() -> list[Admission]:
        seen = [await limits.admit(key, 10)]
        clock.now += 20
        seen.append(await limits.admit(key, 10))
        await limits.release(key, 5)
        await limits.release(key, 5)
        clock.now += 10
        seen.append(await limits.admit(key, 10))  # 2 in the last minute: refused
        seen.append(await limits.admit(key, 10))  # refusals do not count
        clock.now += 30  # the first one has slid out
        seen.append(await limits.admit(key, 10))
        return seen

    first, second, refused, again, after = run(scenario())
    assert first.ok and second.ok and after.ok
    assert refused == Admission(ok=False, limit="rpm", retry_after_s=30)
    assert again == refused


def test_rpm_retry_after_waits_for_enough_requests_to_slide_out() -> None:
    clock, key = FakeClock(), principal(rpm=2)
    limits = LocalLimits(clock)

    async def scenario() -> Admission:
        for step in range(2):
            assert (await limits.admit(key, 1)).ok
            await limits.release(key, 0)
            clock.now += 5 * (step + 1)
        # Admitted at t=0 and t=5, now t=15: room again when the t=0 one leaves.
        return await limits.admit(key, 1)

    assert run(scenario()) == Admission(ok=False, limit="rpm", retry_after_s=45)


def test_tpm_counts_tokens_used_reported_at_release() -> None:
    clock, key = FakeClock(), principal(tpm=100)
    limits = LocalLimits(clock)

    async def scenario() -> list[Admission]:
        seen = [await limits.admit(key, 500)]  # an estimate above tpm is no refusal
        await limits.release(key, 60)
        clock.now += 10
        seen.append(await limits.admit(key, 10))
        await limits.release(key, 40)  # 100 used in the window: spent
        clock.now += 5
        seen.append(await limits.admit(key, 1))
        clock.now += 45  # the 60 from t=0 slides out at t=60
        seen.append(await limits.admit(key, 1))
        return seen

    first, second, refused, after = run(scenario())
    assert first.ok and second.ok and after.ok
    assert refused == Admission(ok=False, limit="tpm", retry_after_s=45)


def test_concurrency_counts_requests_in_flight() -> None:
    key = principal(concurrency=2)
    limits = LocalLimits(FakeClock())

    async def scenario() -> list[bool]:
        seen = [(await limits.admit(key, 1)).ok for _ in range(3)]
        await limits.release(key, 3)
        seen.append((await limits.admit(key, 1)).ok)
        seen.append((await limits.admit(key, 1)).ok)
        return seen

    assert run(scenario()) == [True, True, False, True, False]
    assert run(LocalLimits().admit(principal(concurrency=1), 1)).ok  # a fresh backend


def test_keys_are_counted_apart_and_no_limit_means_none() -> None:
    limited, other, free = principal("0000000a", rpm=1), principal("0000000b", rpm=1), principal()
    limits = LocalLimits(FakeClock())

    async def scenario() -> list[bool]:
        return [
            (await limits.admit(limited, 1)).ok,
            (await limits.admit(limited, 1)).ok,
            (await limits.admit(other, 1)).ok,
            *[(await limits.admit(free, 10**6)).ok for _ in range(1000)],
        ]

    assert run(scenario()) == [True, False, True, *[True] * 1000]


# --- the router's 429s --------------------------------------------------------------


class RecordingLimits(LocalLimits):
    """LocalLimits that also keeps what the router released, per key id."""

    def __init__(self) -> None:
        super().__init__()
        self.released: list[tuple[str, int]] = []

    async def release(self, principal: Principal, tokens_used: int) -> None:
        self.released.append((principal.id, tokens_used))
        await super().release(principal, tokens_used)


def keyed_fleet(
    tmp_path: Path, key_limits: dict[str, int], **fleet: Any
) -> tuple[Fleet, dict[str, str], dict[str, str]]:
    """A fleet with a limited key and an unlimited one; their Authorization headers."""
    path = tmp_path / "keys.yaml"
    limited = create_key(path, "limited", **key_limits)
    other = create_key(path, "other")
    app = make_fleet(keys=KeyRing.from_file(path), **fleet)
    return app, {"Authorization": f"Bearer {limited}"}, {"Authorization": f"Bearer {other}"}


def assert_429(response: Any, code: str, max_retry_s: int) -> None:
    error = openai_error(response, 429, code)
    assert error["type"] == "rate_limit_error"
    assert 1 <= int(response.headers["retry-after"]) <= max_retry_s
    assert f"retry in {response.headers['retry-after']} s" in error["message"]


def test_rpm_reached_is_429_while_another_key_is_unaffected(tmp_path: Path) -> None:
    metrics = RecordingMetrics()
    fleet, limited, other = keyed_fleet(tmp_path, {"rpm": 2}, metrics=metrics)
    with TestClient(fleet.app) as http:
        for _ in range(2):
            assert http.post(CHAT_PATH, json=chat(), headers=limited).status_code == 200
        refused = http.post(CHAT_PATH, json=chat(), headers=limited)
        assert_429(refused, "rate_limit_exceeded_rpm", 60)
        assert "limit of 2 requests per minute" in refused.json()["error"]["message"]
        assert all(http.post(CHAT_PATH, json=chat(), headers=other).is_success for _ in "abc")
    assert [r.rejection for r in metrics.finished if r.status == 429] == ["quota"]
    assert [r.error_code for r in metrics.finished].count("rate_limit_exceeded_rpm") == 1


def test_tpm_reached_is_429_counting_prompt_and_completion(tmp_path: Path) -> None:
    fleet, limited, other = keyed_fleet(tmp_path, {"tpm": 10})
    with TestClient(fleet.app) as http:
        # The fake echoes: 4 prompt + 4 completion tokens, then 3 + 3.
        assert http.post(CHAT_PATH, json=chat("one two three four"), headers=limited).is_success
        assert http.post(CHAT_PATH, json=chat("one two three"), headers=limited).is_success
        refused = http.post(CHAT_PATH, json=chat("one"), headers=limited)
        assert_429(refused, "rate_limit_exceeded_tpm", 60)
        assert "limit of 10 tokens per minute" in refused.json()["error"]["message"]
        assert http.post(CHAT_PATH, json=chat("one two three four"), headers=other).is_success


def test_a_stream_is_charged_its_usage_even_when_the_client_did_not_ask(tmp_path: Path) -> None:
    limits = RecordingLimits()
    fleet, limited, _ = keyed_fleet(tmp_path, {"tpm": 1000}, limits=limits)
    body = {"model": COMPLETIONS_MODEL, "prompt": "one two three", "stream": True}
    with TestClient(fleet.app) as http:
        response = http.post(COMPLETIONS_PATH, json=body, headers=limited)
    assert all("usage" not in chunk for chunk in sse_payloads(response))
    assert [tokens for _, tokens in limits.released] == [6]


async def _long_stream_then_leave(fleet: Fleet, headers: dict[str, str]) -> None:
    prompt = " ".join(["w"] * 60)
    body = {"model": COMPLETIONS_MODEL, "prompt": prompt, "stream": True, "max_tokens": 60}
    await post_then_leave(fleet.app, COMPLETIONS_PATH, body, leave_after_s=0.4, headers=headers)


def test_a_disconnect_charges_what_was_generated_before_it(tmp_path: Path) -> None:
    limits = RecordingLimits()
    fleet, limited, _ = keyed_fleet(
        tmp_path, {"tpm": 5, "concurrency": 1}, limits=limits, token_delay_s=0.02
    )
    run(_long_stream_then_leave(fleet, limited))
    [(_, charged)] = limits.released
    assert 5 <= charged < 60  # frames relayed before leaving; the prompt's usage never came
    assert run(fleet.unfinished()) == 0
    with TestClient(fleet.app) as http:
        # The slot is free again, the tokens are spent.
        assert_429(
            http.post(CHAT_PATH, json=chat(), headers=limited), "rate_limit_exceeded_tpm", 60
        )


def test_concurrency_reached_is_429_until_a_request_ends(tmp_path: Path) -> None:
    fleet, limited, other = keyed_fleet(tmp_path, {"concurrency": 1}, token_delay_s=0.05)

    async def scenario() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=fleet.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            slow = asyncio.create_task(
                http.post(CHAT_PATH, json=chat("a b c d e f g h", stream=True), headers=limited)
            )
            while await fleet.unfinished() == 0:
                await asyncio.sleep(0.01)
            refused = await http.post(CHAT_PATH, json=chat(), headers=limited)
            elsewhere = await http.post(CHAT_PATH, json=chat(), headers=other)
            first = await slow
            after = await http.post(CHAT_PATH, json=chat(), headers=limited)
            return [refused, elsewhere, first, after]

    refused, elsewhere, first, after = run(scenario())
    assert_429(refused, "concurrency_limit_exceeded", 1)
    assert "limit of 1 concurrent requests" in refused.json()["error"]["message"]
    assert [elsewhere.status_code, first.status_code, after.status_code] == [200, 200, 200]


@pytest.mark.parametrize("failure", ["engine 400", "not json", "model not ready"])
def test_a_failed_request_frees_its_concurrency_slot(tmp_path: Path, failure: str) -> None:
    status = FakeStatusSource()
    status.set(COMPLETIONS_MODEL, "loading")
    fleet, limited, _ = keyed_fleet(tmp_path, {"concurrency": 1}, status=status)
    request: dict[str, Any] = {
        "engine 400": {"json": chat(" ".join(["w"] * 300), max_tokens=1)},
        "not json": {"content": b"{"},
        "model not ready": {"json": {"model": COMPLETIONS_MODEL, "prompt": "a"}},
    }[failure]
    with TestClient(fleet.app) as http:
        path = COMPLETIONS_PATH if failure == "model not ready" else CHAT_PATH
        for _ in range(3):
            assert not http.post(path, headers=limited, **request).is_success
        assert http.post(CHAT_PATH, json=chat(), headers=limited).is_success


def test_a_stream_the_server_never_started_sending_frees_its_slot(tmp_path: Path) -> None:
    """The client leaves after the first frame is in but before the response starts:
    Starlette cancels the sending before the relay runs, so only the response itself
    can end the request."""
    fleet, limited, _ = keyed_fleet(tmp_path, {"concurrency": 1}, token_delay_s=0.05)
    raw = json.dumps({"model": COMPLETIONS_MODEL, "prompt": "a b c d e f", "stream": True})

    async def leave_before_the_response() -> tuple[list[Message], int]:
        sent: list[Message] = []
        calls = 0

        async def receive() -> Message:
            nonlocal calls
            calls += 1
            if calls == 1:
                return {"type": "http.request", "body": raw.encode(), "more_body": False}
            if calls <= 3:
                # The router's watches while the model gets ready and while the first
                # frame comes; each is cancelled when what it watches is done.
                await asyncio.Event().wait()
            return {"type": "http.disconnect"}  # what the response's own watch hears

        async def send(message: Message) -> None:
            await asyncio.sleep(0)  # a server's send may wait (flow control): cancellable
            sent.append(message)

        scope = post_scope(COMPLETIONS_PATH, limited)
        await asyncio.wait_for(fleet.app(scope, receive, send), timeout=10)
        await asyncio.sleep(0.1)
        return sent, await fleet.unfinished()

    sent, unfinished = run(leave_before_the_response())
    assert not any(m["type"] == "http.response.body" and m.get("body") for m in sent)
    assert unfinished == 0  # the generation was aborted
    with TestClient(fleet.app) as http:
        assert http.post(CHAT_PATH, json=chat(), headers=limited).is_success


def test_shared_limits_count_locally_while_the_actor_is_unreachable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from ray.exceptions import RaySystemError

    from router.shared_limits import SharedLimits

    shared = SharedLimits("app")

    def unreachable() -> Any:
        raise RaySystemError("GCS unavailable")

    shared._get_actor = unreachable  # type: ignore[method-assign]
    key = principal(rpm=2)
    results = run(_admit_times(shared, key, 3))
    assert [r.ok for r in results] == [True, True, False]
    assert results[2].limit == "rpm"
    assert "limits actor unreachable" in caplog.text


async def _admit_times(backend: Any, key: Principal, times: int) -> list[Admission]:
    return [await backend.admit(key, 1) for _ in range(times)]
