"""HandleModelClient over a stand-in for a Ray Serve handle: what Serve raises becomes
the router's own OpenAI errors, wherever Serve raises it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from llm_fleet.router.api_errors import (
    InternalServerError,
    ReplicaLostError,
    ServiceUnavailableError,
)
from llm_fleet.router.model_client import HandleModelClient


class FakeResponse:
    """A streaming DeploymentResponseGenerator: ``items``, then ``error`` if set. Like
    Serve's, ``cancel()`` re-raises the error the call ended with (``cancel_raises``)."""

    def __init__(
        self, items: list[str], error: Exception | None, cancel_raises: Exception | None
    ) -> None:
        self.items, self.error, self.cancel_raises = items, error, cancel_raises
        self.cancelled = False

    async def _gen(self) -> AsyncIterator[str]:
        for item in self.items:
            yield item
        if self.error is not None:
            raise self.error

    def __aiter__(self) -> AsyncIterator[str]:
        return self._gen()

    def cancel(self) -> None:
        self.cancelled = True
        if self.cancel_raises is not None:
            raise self.cancel_raises


class FakeHandle:
    """``handle.options(...).generate.remote(...)``; ``at_call`` is raised by ``remote``
    itself, ``mid_stream`` after ``items``."""

    def __init__(
        self,
        at_call: Exception | None = None,
        mid_stream: Exception | None = None,
        cancel_raises: Exception | None = None,
    ) -> None:
        self.at_call, self.mid_stream, self.cancel_raises = at_call, mid_stream, cancel_raises
        self.responses: list[FakeResponse] = []
        self.generate = self

    def options(self, **_: Any) -> FakeHandle:
        return self

    def remote(self, *_: Any) -> FakeResponse:
        if self.at_call is not None:
            raise self.at_call
        response = FakeResponse(["data: a\n\n", "data: b\n\n"], self.mid_stream, self.cancel_raises)
        self.responses.append(response)
        return response


async def _drain(client: HandleModelClient) -> list[Any]:
    return [item async for item in client.stream("chat", {}, "req-1")]


BACKPRESSURE = BackPressureError(num_queued_requests=4, max_queued_requests=4, retry_after_s=3)


@pytest.mark.parametrize("where", ["at_call", "mid_stream"])
@pytest.mark.parametrize(
    ("error", "retry_after_s"),
    [(BACKPRESSURE, 3), (DeploymentUnavailableError("m"), 1)],
    ids=["backpressure", "unavailable"],
)
@pytest.mark.parametrize("transport", ["actor", "grpc"])
def test_serve_refusals_become_the_routers_503(
    where: str, error: Exception, retry_after_s: int, transport: Any
) -> None:
    # As Serve's does, the failed call's cancel() would raise its error again.
    handle = FakeHandle(**{where: error}, cancel_raises=error)
    client = HandleModelClient("m", handle, transport=transport)  # type: ignore[arg-type]
    with pytest.raises(ServiceUnavailableError) as raised:
        asyncio.run(_drain(client))
    assert raised.value.status_code == 503
    assert raised.value.retry_after_s == retry_after_s
    assert "at capacity" in raised.value.message


async def _first_then_close(client: HandleModelClient) -> Any:
    stream = client.stream("chat", {}, "req-1")
    first = await anext(stream)  # type: ignore[call-overload]
    await stream.aclose()  # type: ignore[attr-defined]
    return first


@pytest.mark.parametrize("cancel_raises", [None, BACKPRESSURE], ids=["plain", "refused"])
def test_closing_early_cancels_the_call(cancel_raises: Exception | None) -> None:
    """A client that leaves closes the stream: the call is cancelled (the generation
    aborted), and a refusal cancel() re-raises stays inside."""
    handle = FakeHandle(cancel_raises=cancel_raises)
    client = HandleModelClient("m", handle)  # type: ignore[arg-type]
    assert asyncio.run(_first_then_close(client)) == "data: a\n\n"
    assert [response.cancelled for response in handle.responses] == [True]


def test_a_stream_that_ends_is_not_cancelled() -> None:
    handle = FakeHandle(cancel_raises=RuntimeError("cancel() of a finished call"))
    client = HandleModelClient("m", handle)  # type: ignore[arg-type]
    assert len(asyncio.run(_drain(client))) == 2
    assert [response.cancelled for response in handle.responses] == [False]


def test_other_failures_are_a_500_that_hides_the_detail() -> None:
    handle = FakeHandle(mid_stream=RuntimeError("secret detail"))
    client = HandleModelClient("m", handle)  # type: ignore[arg-type]
    with pytest.raises(InternalServerError) as raised:
        asyncio.run(_drain(client))
    assert raised.value.message == "model m: RuntimeError"


@pytest.mark.parametrize("where", ["at_call", "mid_stream"])
@pytest.mark.parametrize(
    "error",
    [ActorUnavailableError("Actor is unavailable.", b"\0" * 16), ActorDiedError()],
    ids=["unavailable", "died"],
)
def test_a_replica_lost_under_the_call_is_a_503_to_retry(
    where: str, error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    """What Serve raises when the replica's node dies (seen on a real multi-node cluster:
    ``ActorUnavailableError`` mid-stream, tests/process/test_cluster.py)."""
    handle = FakeHandle(**{where: error})
    client = HandleModelClient("m", handle)  # type: ignore[arg-type]
    with pytest.raises(ReplicaLostError) as raised:
        asyncio.run(_drain(client))
    assert raised.value.status_code == 503
    assert raised.value.code == "replica_lost"
    assert raised.value.retry_after_s == 1
    assert "model 'm'" in raised.value.message
    assert f"to model m failed: {type(error).__name__}" in caplog.text


def test_the_prefix_key_is_the_prompts_start() -> None:
    from llm_fleet.router.model_client import prefix_key

    system = {"role": "system", "content": "You are a ship's cook. " * 40}

    def chat(*messages: dict[str, Any]) -> dict[str, Any]:
        return {"messages": list(messages)}

    one = prefix_key("chat", chat(system, {"role": "user", "content": "soup?"}), 256)
    two = prefix_key("chat", chat(system, {"role": "user", "content": "bread?"}), 256)
    assert one == two  # the same first 256 characters: the same replica
    whole = prefix_key("chat", chat(system, {"role": "user", "content": "bread?"}), 100_000)
    assert whole != prefix_key("chat", chat(system, {"role": "user", "content": "soup?"}), 100_000)
    other = {"role": "system", "content": "You are a pilot. " * 40}
    assert prefix_key("chat", chat(other), 256) != one
    assert len(one) == 16
    assert prefix_key("completions", {"prompt": "abc" * 100}, 10) == prefix_key(
        "completions", {"prompt": "abc" * 50}, 10
    )


def test_with_prefix_affinity_each_call_carries_the_prompts_key() -> None:
    seen: list[dict[str, Any]] = []

    class OptionsRecorder(FakeHandle):
        def options(self, **options: Any) -> FakeHandle:
            seen.append(options)
            return self

    handle = OptionsRecorder()
    client = HandleModelClient("m", handle, affinity_chars=64)  # type: ignore[arg-type]
    body = {"messages": [{"role": "system", "content": "x" * 100}]}
    asyncio.run(_drain_body(client, body))
    from llm_fleet.router.model_client import prefix_key

    assert {"session_id": prefix_key("chat", body, 64)} in seen


async def _drain_body(client: HandleModelClient, body: dict[str, Any]) -> list[Any]:
    return [item async for item in client.stream("chat", body, "req-1")]


class LosingHandle(FakeHandle):
    """The first ``losses`` calls die before answering (the replica's node lost); the
    next ones answer."""

    def __init__(self, losses: int) -> None:
        super().__init__()
        self.losses, self.calls = losses, 0

    def remote(self, *_: Any) -> FakeResponse:
        self.calls += 1
        error = ActorUnavailableError("Actor is unavailable.", b"\0" * 16)
        response = FakeResponse(
            [] if self.calls <= self.losses else ["data: a\n\n"],
            error if self.calls <= self.losses else None,
            None,
        )
        self.responses.append(response)
        return response


@pytest.mark.parametrize(("losses", "answered"), [(1, True), (2, True), (3, False)])
def test_a_request_whose_replica_died_before_answering_is_sent_again(
    losses: int, answered: bool
) -> None:
    handle = LosingHandle(losses)
    client = HandleModelClient("m", handle)  # type: ignore[arg-type]
    if answered:
        assert asyncio.run(_drain(client)) == ["data: a\n\n"]
        assert handle.calls == losses + 1
    else:
        with pytest.raises(ReplicaLostError):
            asyncio.run(_drain(client))
        assert handle.calls == 3  # the first call and two more


def test_closing_the_stream_early_still_cancels_the_call() -> None:
    handle = FakeHandle()
    client = HandleModelClient("m", handle)  # type: ignore[arg-type]

    async def first_only() -> None:
        stream = client.stream("chat", {}, "req-1")
        await anext(stream)
        await stream.aclose()  # type: ignore[attr-defined]

    asyncio.run(first_only())
    assert [response.cancelled for response in handle.responses] == [True]
