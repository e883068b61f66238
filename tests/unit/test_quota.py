"""Per-key limits: LocalQuota' sliding windows, and the 429s the router answers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from starlette.types import Message

from llm_fleet.router.auth import KeyLimits, KeyRing, Principal
from llm_fleet.router.keys_file import create_key
from llm_fleet.router.quota import LOCAL_HOLDER, Admission, LocalQuota
from tests.fake_time import FakeTime
from tests.fakes import (
    CHAT_MODEL,
    COMPLETIONS_MODEL,
    FakeStatusSource,
    Fleet,
    RecordingMetrics,
    make_fleet,
    post_scope,
    post_then_leave,
)
from tests.unit.ops_helpers import CHAT_PATH, COMPLETIONS_PATH, chat, openai_error, sse_payloads


def principal(key_id: str = "0000000a", **limits: int) -> Principal:
    return Principal(name=key_id, id=key_id, models=None, limits=KeyLimits(**limits))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# --- LocalQuota --------------------------------------------------------------------


def test_rpm_counts_admitted_requests_over_a_sliding_minute() -> None:
    clock, key = FakeTime(), principal(rpm=2)
    limits = LocalQuota(clock)

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
    clock, key = FakeTime(), principal(rpm=2)
    limits = LocalQuota(clock)

    async def scenario() -> Admission:
        for step in range(2):
            assert (await limits.admit(key, 1)).ok
            await limits.release(key, 0)
            clock.now += 5 * (step + 1)
        # Admitted at t=0 and t=5, now t=15: room again when the t=0 one leaves.
        return await limits.admit(key, 1)

    assert run(scenario()) == Admission(ok=False, limit="rpm", retry_after_s=45)


def test_tpm_counts_tokens_used_reported_at_release() -> None:
    clock, key = FakeTime(), principal(tpm=100)
    limits = LocalQuota(clock)

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
    limits = LocalQuota(FakeTime())

    async def scenario() -> list[bool]:
        seen = [(await limits.admit(key, 1)).ok for _ in range(3)]
        await limits.release(key, 3)
        seen.append((await limits.admit(key, 1)).ok)
        seen.append((await limits.admit(key, 1)).ok)
        return seen

    assert run(scenario()) == [True, True, False, True, False]
    assert run(LocalQuota().admit(principal(concurrency=1), 1)).ok  # a fresh backend


def test_keys_are_counted_apart_and_no_limit_means_none() -> None:
    limited, other, free = principal("0000000a", rpm=1), principal("0000000b", rpm=1), principal()
    limits = LocalQuota(FakeTime())

    async def scenario() -> list[bool]:
        return [
            (await limits.admit(limited, 1)).ok,
            (await limits.admit(limited, 1)).ok,
            (await limits.admit(other, 1)).ok,
            *[(await limits.admit(free, 10**6)).ok for _ in range(1000)],
        ]

    assert run(scenario()) == [True, False, True, *[True] * 1000]


def test_a_holder_not_seen_for_its_lease_loses_its_slots(caplog: pytest.LogCaptureFixture) -> None:
    clock, key = FakeTime(), principal(concurrency=2)
    limits = LocalQuota(clock, lease_s=30)

    async def scenario() -> list[bool]:
        seen = [(await limits.admit(key, 1, holder)).ok for holder in ("dead", "alive", "new")]
        clock.now += 20
        await limits.renew("alive")
        clock.now += 20  # "dead" last seen 40 s ago, "alive" 20 s ago
        seen.append((await limits.admit(key, 1, "new")).ok)  # the dead one's slot came back
        seen.append((await limits.admit(key, 1, "new")).ok)  # "alive" kept its slot
        await limits.release(key, 7, "dead")  # too late: frees nobody else's slot
        await limits.release(key, 7, "dead")  # and never goes below 0
        seen.append((await limits.admit(key, 1, "new")).ok)
        return seen

    assert run(scenario()) == [True, True, False, True, False, False]
    assert "quota holder dead not seen for over 30 s: freed its 1 concurrency" in caplog.text
    assert "'0000000a': 1" in caplog.text and "alive" not in caplog.text
    counts = limits.snapshot()
    assert counts["keys"]["0000000a"] == {
        "in_flight": 2,
        "admitted": 3,
        "tokens": 14,
        "holders": {"alive": 1, "new": 1},
    }
    assert {h: c["in_flight"] for h, c in counts["holders"].items()} == {
        "alive": 1,
        "new": 1,
        "dead": 0,
    }


def test_a_release_without_a_slot_frees_nothing() -> None:
    key = principal(concurrency=1)
    limits = LocalQuota(FakeTime())

    async def scenario() -> list[bool]:
        await limits.release(key, 0)  # a release with no admit (a lost lease, a restart)
        return [(await limits.admit(key, 1)).ok, (await limits.admit(key, 1)).ok]

    assert run(scenario()) == [True, False]


def test_snapshot_counts_per_key_and_per_holder_over_the_window() -> None:
    clock = FakeTime()
    limits = LocalQuota(clock, lease_s=30)
    key_a, key_b = principal("0000000a"), principal("0000000b")

    async def scenario() -> None:
        await limits.admit(key_a, 1, "r1")
        await limits.admit(key_a, 1, "r1")
        await limits.release(key_a, 10, "r1")
        clock.now += 3
        await limits.admit(key_b, 1, "r2")
        clock.now += 5

    run(scenario())
    assert limits.snapshot() == {
        "keys": {
            "0000000a": {"in_flight": 1, "admitted": 2, "tokens": 10, "holders": {"r1": 1}},
            "0000000b": {"in_flight": 1, "admitted": 1, "tokens": 0, "holders": {"r2": 1}},
        },
        "holders": {
            "r1": {"in_flight": 1, "seen_s_ago": 8.0},
            "r2": {"in_flight": 1, "seen_s_ago": 5.0},
        },
    }
    clock.now += 60  # the window slid past everything, both leases lapsed
    assert limits.snapshot() == {
        "keys": {
            "0000000a": {"in_flight": 0, "admitted": 0, "tokens": 0, "holders": {}},
            "0000000b": {"in_flight": 0, "admitted": 0, "tokens": 0, "holders": {}},
        },
        "holders": {},
    }


# --- the router's 429s --------------------------------------------------------------


class RecordingLimits(LocalQuota):
    """LocalQuota that also keeps what the router released, per key id."""

    def __init__(self) -> None:
        super().__init__()
        self.released: list[tuple[str, int]] = []

    async def release(
        self, principal: Principal, tokens_used: int, holder: str = LOCAL_HOLDER
    ) -> None:
        self.released.append((principal.id, tokens_used))
        await super().release(principal, tokens_used, holder)


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
    fleet, limited, _ = keyed_fleet(tmp_path, {"tpm": 1000}, quota=limits)
    body = {"model": COMPLETIONS_MODEL, "prompt": "one two three", "stream": True}
    with TestClient(fleet.app) as http:
        response = http.post(COMPLETIONS_PATH, json=body, headers=limited)
    chunks = sse_payloads(response)
    assert chunks and all("usage" not in chunk for chunk in chunks)
    assert [tokens for _, tokens in limits.released] == [6]


async def _long_stream_then_leave(fleet: Fleet, headers: dict[str, str]) -> None:
    prompt = " ".join(["w"] * 60)
    # 60 tokens take 3 s (token_delay_s 0.05): leaving after 1 s cuts the stream, and
    # leaves time for a few frames however busy the machine is.
    body = {"model": COMPLETIONS_MODEL, "prompt": prompt, "stream": True, "max_tokens": 60}
    await post_then_leave(fleet.app, COMPLETIONS_PATH, body, leave_after_s=1.0, headers=headers)


def test_a_disconnect_charges_what_was_generated_before_it(tmp_path: Path) -> None:
    limits = RecordingLimits()
    fleet, limited, _ = keyed_fleet(
        tmp_path, {"tpm": 5, "concurrency": 1}, quota=limits, token_delay_s=0.05
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


def test_shared_quota_count_locally_while_the_actor_is_unreachable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from ray.exceptions import RaySystemError

    from llm_fleet.router.shared_quota import SharedQuota

    shared = SharedQuota("app")

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


class FakeActorHandle:
    """A Ray actor handle without Ray: ``handle.method.remote(*args)`` is a coroutine
    of the real ``_QuotaActor``, in this process. ``failing`` methods raise once."""

    def __init__(
        self,
        lease_s: float | None = None,
        failing: tuple[str, ...] = (),
        clock: FakeTime | None = None,
    ) -> None:
        from llm_fleet.router.shared_quota import _QuotaActor

        self.actor = _QuotaActor(lease_s, clock or FakeTime())
        self.calls: list[str] = []
        self._failing = set(failing)

    def __getattr__(self, method: str) -> Any:
        from ray.exceptions import RaySystemError

        async def remote(*args: Any) -> Any:
            self.calls.append(method)
            if method in self._failing:
                self._failing.discard(method)
                raise RaySystemError("GCS unavailable")
            return await getattr(self.actor, method)(*args)

        return SimpleNamespace(remote=remote)

    def in_flight(self) -> int:
        return sum(k["in_flight"] for k in self.actor._quota.snapshot()["keys"].values())


def test_shared_quota_release_to_the_count_that_admitted() -> None:
    from ray.exceptions import RaySystemError

    from llm_fleet.router.shared_quota import SharedQuota

    shared, handle, key = SharedQuota("app"), FakeActorHandle(), principal(concurrency=1)

    def reachable() -> Any:
        return handle

    def unreachable() -> Any:
        raise RaySystemError("GCS unavailable")

    async def scenario() -> list[Any]:
        seen: list[Any] = []
        shared._get_actor = reachable  # type: ignore[method-assign]
        await handle.actor.admit(key, 1, "another-replica")
        shared._get_actor = unreachable  # type: ignore[method-assign]
        seen.append((await shared.admit(key, 1)).ok)  # counted in this replica
        shared._get_actor = reachable  # type: ignore[method-assign]
        await shared.release(key, 5)  # frees the local slot, not the other replica's
        seen.append(handle.in_flight())
        seen.append((await shared.admit(key, 1)).ok)  # the actor's count: full
        await handle.actor.release(key, 0, "another-replica")
        seen.append((await shared.admit(key, 1)).ok)  # admitted by the actor
        shared._get_actor = unreachable  # type: ignore[method-assign]
        seen.append((await shared.admit(key, 1)).ok)  # the local slot was freed
        await shared.release(key, 0)  # the local one ends
        shared._get_actor = reachable  # type: ignore[method-assign]
        await shared.release(key, 0)  # the actor's one ends
        seen.append(handle.in_flight())
        await shared.stop()
        return seen

    assert run(scenario()) == [True, 1, False, True, True, 0]


def test_shared_quota_renew_the_lease_while_requests_are_in_flight(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from llm_fleet.router.shared_quota import SharedQuota

    time = FakeTime()
    shared = SharedQuota("app", lease_s=30, sleep=time.sleep)  # renews every 10 s
    handle, key = FakeActorHandle(lease_s=30, failing=("renew",), clock=time), principal()
    shared._get_actor = lambda: handle  # type: ignore[method-assign]

    async def scenario() -> tuple[int, int, int, int]:
        await shared.admit(key, 1)
        await time.advance(70)  # more than two leases: only the renewals keep the slot
        held_after_leases = handle.in_flight()
        await shared.release(key, 3)
        renewals = handle.calls.count("renew")
        await time.advance(30)
        idle_renewals = handle.calls.count("renew") - renewals
        await shared.admit(key, 1)
        await shared.stop()  # the replica shuts down: no more renewals
        stopped = handle.calls.count("renew")
        await time.advance(30)
        return held_after_leases, renewals, idle_renewals, handle.calls.count("renew") - stopped

    held, renewals, idle_renewals, after_stop = run(scenario())
    assert held == 1
    assert renewals == 7  # one per 10 s; the first of them failed and the next one renewed
    assert "renewing the quota lease failed" in caplog.text
    assert idle_renewals == 0 and after_stop == 0
    assert time.sleeping == 0


def test_a_renewal_sets_the_holders_slots_to_what_it_really_holds() -> None:
    clock, key, other = FakeTime(), principal(concurrency=2), principal("0000000b", concurrency=1)
    limits = LocalQuota(clock, lease_s=30)

    async def scenario() -> list[Any]:
        seen: list[Any] = [(await limits.admit(key, 1, "r1")).ok for _ in range(2)]
        # r1's release of one of them was lost on the way: the key looks full.
        seen.append((await limits.admit(key, 1, "r2")).ok)
        await limits.renew("r1", {key.id: 1})  # r1 says it holds one
        seen.append((await limits.admit(key, 1, "r2")).ok)
        # A count restarted empty gets r1's slots back from its next renewal.
        fresh = LocalQuota(clock, lease_s=30)
        await fresh.renew("r1", {other.id: 1})
        seen.append((await fresh.admit(other, 1, "r2")).ok)
        await fresh.renew("r1", {})  # nothing held any more
        seen.append((await fresh.admit(other, 1, "r2")).ok)
        seen.append(limits.snapshot()["keys"][key.id]["holders"])
        return seen

    assert run(scenario()) == [True, True, False, True, False, True, {"r1": 1, "r2": 1}]


def test_shared_quota_a_lost_release_is_corrected_by_the_next_renewal() -> None:
    from llm_fleet.router.shared_quota import SharedQuota

    time = FakeTime()
    shared = SharedQuota("app", lease_s=30, sleep=time.sleep)  # renews every 10 s
    handle = FakeActorHandle(lease_s=60, failing=("release",), clock=time)
    key = principal(concurrency=2)
    shared._get_actor = lambda: handle  # type: ignore[method-assign]

    async def scenario() -> list[int]:
        await shared.admit(key, 1)
        await shared.admit(key, 1)
        await shared.release(key, 3)  # lost on the way: the actor still counts 2
        seen = [handle.in_flight()]
        await time.advance(9)
        seen.append(handle.in_flight())  # no renewal yet
        await time.advance(1)  # a renewal says 1
        seen.append(handle.in_flight())
        await shared.release(key, 3)
        await shared.stop()
        seen.append(handle.in_flight())
        return seen

    assert run(scenario()) == [2, 2, 1, 0]


# --- the gateway-wide cap (router.max_concurrent_requests) ----------------------------------


def test_the_gateway_cap_counts_every_request_and_refuses_with_429_gateway_busy() -> None:
    """Two in flight at a cap of 2: the third is a 429 ``gateway_busy`` with Retry-After,
    keys or none; once one ends, the next is served. Its slot is freed however a
    request ends (here: a stream read to its end, an answer, a 404 after the slot)."""
    fleet = make_fleet(token_delay_s=0.2, max_concurrent_requests=2)
    body = {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "a b c d e"}],
        "max_tokens": 5,
    }
    with TestClient(fleet.app) as http:
        unknown = http.post("/v1/chat/completions", json={**body, "model": "nope"})
        assert unknown.status_code == 404  # took a slot, and gave it back

        async def three_at_once() -> list[httpx.Response]:
            transport = httpx.ASGITransport(app=fleet.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                first = [
                    asyncio.create_task(client.post("/v1/chat/completions", json=body))
                    for _ in range(2)
                ]
                await asyncio.sleep(0.3)
                third = await client.post("/api/chat", json=body)
                return [*(await asyncio.gather(*first)), third]

        *served, refused = asyncio.run(three_at_once())
        assert [r.status_code for r in served] == [200, 200]
        assert refused.status_code == 429, refused.text
        error = refused.json()["error"]
        assert (error["type"], error["code"]) == ("rate_limit_error", "gateway_busy")
        assert "2 concurrent requests" in error["message"]
        assert refused.headers["retry-after"] == "1"
        assert http.post("/v1/chat/completions", json=body).status_code == 200
