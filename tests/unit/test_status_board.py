"""The status board's polling (router/status_board.py), on fake time, without Ray."""

from __future__ import annotations

import asyncio
import logging

import pytest

from llm_fleet.router.model_status import ModelStatus, State
from llm_fleet.router.status_board import ServeStatusBoard
from tests.fake_time import FakeTime
from tests.fakes import fleet_config


def status(state: State) -> dict[str, ModelStatus]:
    return {"m": ModelStatus(model="m", state=state, min_replicas=1, max_replicas=1)}


def state_of(board: ServeStatusBoard) -> str | None:
    current = board.status("m")
    return None if current is None else current.state


def test_the_board_polls_every_interval_and_outlives_a_failed_poll(
    caplog: pytest.LogCaptureFixture,
) -> None:
    time, updates = FakeTime(), []
    answers: list[object] = [
        status("loading"),
        ConnectionError("GCS away"),  # expected: warned, the last view kept
        RuntimeError("a bug in one poll"),  # unexpected: logged, polling goes on
        status("ready"),
    ]
    reads: list[float] = []

    def read() -> tuple[dict[str, ModelStatus], dict[str, str]]:
        reads.append(time.now)
        answer = answers[min(len(reads), len(answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer, {}  # type: ignore[return-value]

    async def scenario() -> list[str | None]:
        config = fleet_config(status_poll_interval_s=3.0)
        board = ServeStatusBoard({}, config, {}, on_update=updates.append, sleep=time.sleep)
        board._read = read  # type: ignore[method-assign]
        await board.start()  # reads once before the first request
        seen = [state_of(board)]
        await time.advance(2.9)
        await time.advance(0.1)  # the GCS is away: the last view stays
        seen.append(state_of(board))
        await time.advance(6.0)
        seen.append(state_of(board))
        await board.stop()
        await time.advance(30.0)
        return seen

    assert asyncio.run(scenario()) == ["loading", "loading", "ready"]
    assert reads == [1000.0, 1003.0, 1006.0, 1009.0]
    assert [u["m"].state for u in updates] == ["loading", "ready"]
    assert "could not read the models' status from Ray Serve: GCS away" in caplog.text
    [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert error.getMessage() == "polling the models' status failed; retrying"
