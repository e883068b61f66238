"""RayRouterMetrics (router/metrics.py) over fake Ray metric objects: what it records for a
request and a model update, and the names and labels it exports. No Ray cluster: the
``ray.serve.metrics`` constructors are replaced by fakes that check tags as Ray does."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from llm_fleet.router.accounting import RequestRecord
from llm_fleet.router.metrics import RayRouterMetrics
from llm_fleet.router.model_status import ModelStatus
from tests.infra_queries import DOCUMENTED_METRICS

README = Path(__file__).resolve().parents[2] / "README.md"


class FakeMetric:
    """One declared metric and every value recorded to it, as (value, tags)."""

    kind = ""

    def __init__(
        self,
        name: str,
        description: str = "",
        boundaries: list[float] | None = None,
        tag_keys: tuple[str, ...] | None = None,
    ) -> None:
        self.name = name
        self.description = description
        self.boundaries = boundaries
        self.tag_keys = tuple(tag_keys or ())
        self.recorded: list[tuple[float, dict[str, str]]] = []

    def _record(self, value: float, tags: dict[str, str] | None) -> None:
        tags = dict(tags or {})
        # Ray refuses a missing tag and a tag value that is not a str; we also refuse an
        # undeclared one, which Ray would silently export as a new label.
        if set(tags) != set(self.tag_keys):
            raise ValueError(f"{self.name}: tags {sorted(tags)} != {sorted(self.tag_keys)}")
        if not all(isinstance(v, str) for v in tags.values()):
            raise TypeError(f"{self.name}: tag values must be str: {tags}")
        if not isinstance(value, int | float):
            raise TypeError(f"{self.name}: value must be int or float, got {value!r}")
        self.recorded.append((value, tags))


class FakeCounter(FakeMetric):
    kind = "counter"

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        if value <= 0:
            raise ValueError(f"{self.name}: value must be >0, got {value}")  # as Ray
        self._record(value, tags)


class FakeGauge(FakeMetric):
    kind = "gauge"

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._record(value, tags)


class FakeHistogram(FakeMetric):
    kind = "histogram"

    def __init__(self, name: str, description: str = "", **fields: Any) -> None:
        if not fields.get("boundaries"):
            raise ValueError(f"{name}: a histogram needs boundaries")  # as Ray
        super().__init__(name, description, **fields)

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._record(value, tags)


@pytest.fixture
def declared(monkeypatch: pytest.MonkeyPatch) -> dict[str, FakeMetric]:
    """Every metric the recorder declares, by name (filled when it is created)."""
    from ray.serve import metrics

    made: dict[str, FakeMetric] = {}

    def maker(cls: type[FakeMetric]) -> Any:
        def make(name: str, *args: Any, **kwargs: Any) -> FakeMetric:
            assert name not in made, f"{name} declared twice"
            made[name] = cls(name, *args, **kwargs)
            return made[name]

        return make

    monkeypatch.setattr(metrics, "Counter", maker(FakeCounter))
    monkeypatch.setattr(metrics, "Gauge", maker(FakeGauge))
    monkeypatch.setattr(metrics, "Histogram", maker(FakeHistogram))
    return made


def recorded(declared: dict[str, FakeMetric]) -> dict[str, list[tuple[float, dict[str, str]]]]:
    """What was recorded since the last call, per metric (metrics with nothing left out)."""
    seen = {name: list(m.recorded) for name, m in declared.items() if m.recorded}
    for metric in declared.values():
        metric.recorded.clear()
    return seen


def a_stream(model: str = "chat-model") -> RequestRecord:
    """A streamed chat request with round times: 0.5 s to the first of 5 frames, 2 s in all."""
    return RequestRecord(
        request_id="r-1",
        endpoint="chat",
        started=100.0,
        model=model,
        stream=True,
        dispatched_at=100.1,
        first_frame_at=100.5,
        last_frame_at=101.5,
        frames=5,
        prompt_tokens=7,
        completion_tokens=5,
    )


def test_a_dispatched_and_finished_stream(declared: dict[str, FakeMetric]) -> None:
    metrics = RayRouterMetrics()
    first, second = a_stream(), a_stream()
    metrics.request_dispatched(first)
    metrics.request_dispatched(second)
    assert recorded(declared) == {
        "llm_fleet_requests_in_flight": [(1, {"model": "chat-model"}), (2, {"model": "chat-model"})]
    }

    first.finished_at = 102.0
    metrics.request_finished(first)
    by_request = {"model": "chat-model", "endpoint": "chat"}
    assert recorded(declared) == {
        "llm_fleet_requests_in_flight": [(1, {"model": "chat-model"})],
        "llm_fleet_requests": [(1.0, {**by_request, "status": "200"})],
        "llm_fleet_prompt_tokens": [(7, {"model": "chat-model"})],
        "llm_fleet_completion_tokens": [(5, {"model": "chat-model"})],
        "llm_fleet_request_latency_seconds": [(2.0, by_request)],
        "llm_fleet_time_to_first_token_seconds": [(0.5, by_request)],
        "llm_fleet_inter_token_latency_seconds": [(0.25, by_request)],  # 1 s over 4 gaps
    }


def test_a_client_that_left_and_a_refused_request(declared: dict[str, FakeMetric]) -> None:
    metrics = RayRouterMetrics()
    left = RequestRecord(
        request_id="r-2",
        endpoint="completions",
        started=10.0,
        model="completions-model",
        dispatched_at=10.1,
        status=499,
        disconnected=True,
        tokens_after_disconnect=3,
        finished_at=11.5,
    )
    metrics.request_dispatched(left)
    metrics.request_finished(left)
    by_request = {"model": "completions-model", "endpoint": "completions"}
    assert recorded(declared) == {
        "llm_fleet_requests_in_flight": [
            (1, {"model": "completions-model"}),
            (0, {"model": "completions-model"}),
        ],
        "llm_fleet_requests": [(1.0, {**by_request, "status": "499"})],
        "llm_fleet_request_latency_seconds": [(1.5, by_request)],
        "llm_fleet_client_disconnects": [(1.0, by_request)],
        "llm_fleet_tokens_after_disconnect": [(3, {"model": "completions-model"})],
    }

    refused = RequestRecord(request_id="r-3", endpoint="chat", started=0.0, finished_at=0.25)
    refused.status, refused.rejection = 404, "allowlist"
    metrics.request_finished(refused)  # never dispatched: the gauge is not touched
    by_request = {"model": "unknown", "endpoint": "chat"}
    assert recorded(declared) == {
        "llm_fleet_requests": [(1.0, {**by_request, "status": "404"})],
        "llm_fleet_rejections": [(1.0, {"model": "unknown", "reason": "allowlist"})],
        "llm_fleet_request_latency_seconds": [(0.25, by_request)],
    }


def test_models_updated_sets_every_model_gauge(declared: dict[str, FakeMetric]) -> None:
    metrics = RayRouterMetrics()
    metrics.request_dispatched(a_stream("a"))
    recorded(declared)
    metrics.models_updated(
        {
            "a": ModelStatus("a", "ready", min_replicas=1, max_replicas=3, running=2, starting=1),
            "b": ModelStatus("b", "idle", min_replicas=0, max_replicas=2),
        }
    )
    assert recorded(declared) == {
        # Refreshed every poll, an idle model's 0 included (Ray drops a gauge left unset).
        "llm_fleet_requests_in_flight": [(1, {"model": "a"}), (0, {"model": "b"})],
        "llm_fleet_model_ready": [(1, {"model": "a"}), (0, {"model": "b"})],
        "llm_fleet_model_replicas": [
            (2, {"model": "a", "state": "running"}),
            (1, {"model": "a", "state": "starting"}),
            (0, {"model": "b", "state": "running"}),
            (0, {"model": "b", "state": "starting"}),
        ],
        "llm_fleet_model_min_replicas": [(1, {"model": "a"}), (0, {"model": "b"})],
        "llm_fleet_model_max_replicas": [(3, {"model": "a"}), (2, {"model": "b"})],
    }


def exported(metric: FakeMetric) -> str:
    """The name Prometheus scrapes for it: Ray adds ``ray_``, counters end in ``_total``."""
    return f"ray_{metric.name}" + ("_total" if metric.kind == "counter" else "")


def test_the_exported_names_and_labels_are_the_documented_ones(
    declared: dict[str, FakeMetric],
) -> None:
    RayRouterMetrics()
    # The README's table: | `name`[, `name`] | label, label | meaning |
    documented: dict[str, tuple[str, ...]] = {}
    for row in README.read_text().splitlines():
        if row.startswith("| `ray_llm_fleet_"):
            names, labels = row.split("|")[1:3]
            for name in re.findall(r"`(ray_llm_fleet_\w+)`", names):
                documented[name] = tuple(label.strip() for label in labels.split(","))
    assert {exported(m): m.tag_keys for m in declared.values()} == documented

    # The series the dashboard and alerts may query (tests/infra_queries.py).
    scraped = set()
    for metric in declared.values():
        suffixes = ("_bucket", "_sum", "_count") if metric.kind == "histogram" else ("",)
        scraped |= {exported(metric) + suffix for suffix in suffixes}
    ours = {name for name in DOCUMENTED_METRICS if name.startswith("ray_llm_fleet_")}
    # Not in the operations files: it only appears once a client has left mid-answer.
    assert scraped - ours == {"ray_llm_fleet_tokens_after_disconnect_total"}
    assert ours <= scraped
