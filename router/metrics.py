"""The router's Prometheus metrics, recorded the Ray way.

``RayRouterMetrics`` uses ``ray.serve.metrics``: each node's Ray metrics agent
exports them (Ray adds the ``ray_`` prefix; counters end in ``_total``), with Serve's
``application``/``deployment``/``replica`` labels, so a Prometheus server scraping
every node of the cluster counts each request exactly once, whichever router
replica served it. Label values are bounded: ``model`` is a configured model id or
``unknown``, ``endpoint`` is ``chat`` or ``completions``, ``status`` an HTTP status,
``reason`` one of the rejection reasons in ``deployments/errors.py``: ``allowlist``
(unknown model, or one the API key may not use), ``limits`` (max_tokens, body size),
``bad_request``, ``overload``, ``unavailable`` (model not ready), ``auth`` (no valid
API key) and ``quota`` (the key's rpm, tpm or concurrency). No label carries a key or
its id.

=========================================  ======================================
``llm_fleet_requests_total``               requests finished {model,endpoint,status}
``llm_fleet_rejections_total``             refused before an engine {model,reason}
``llm_fleet_prompt_tokens_total``          prompt tokens {model}
``llm_fleet_completion_tokens_total``      completion tokens {model}
``llm_fleet_time_to_first_token_seconds``  streams: first frame {model,endpoint}
``llm_fleet_inter_token_latency_seconds``  streams: mean gap per request {model,endpoint}
``llm_fleet_request_latency_seconds``      end to end {model,endpoint}
``llm_fleet_requests_in_flight``           gauge per router replica {model}
``llm_fleet_client_disconnects_total``     clients gone before the end {model,endpoint}
``llm_fleet_tokens_after_disconnect_total``  frames the engine sent after that {model}
``llm_fleet_model_ready``                  1 when a replica runs {model}
``llm_fleet_model_replicas``               {model,state=running|starting}
``llm_fleet_model_min_replicas`` / ``_max_replicas``  the configured bounds {model}
=========================================  ======================================
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from llm_fleet.router.accounting import RequestRecord

if TYPE_CHECKING:
    from llm_fleet.router.model_status import ModelStatus

TTFT_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0]
ITL_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
LATENCY_BUCKETS = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0]


class RouterMetrics(Protocol):
    def request_dispatched(self, record: RequestRecord) -> None:
        """A request was sent to its model (in flight from now on)."""
        ...

    def request_finished(self, record: RequestRecord) -> None:
        """A request ended, however it ended; called once per request."""
        ...

    def models_updated(self, statuses: Mapping[str, ModelStatus]) -> None:
        """The latest model states (from the status board)."""
        ...


class NoMetrics:
    def request_dispatched(self, record: RequestRecord) -> None:
        return None

    def request_finished(self, record: RequestRecord) -> None:
        return None

    def models_updated(self, statuses: Mapping[str, ModelStatus]) -> None:
        return None


class RayRouterMetrics:
    """Create inside the router replica (Serve's labels come from its context)."""

    def __init__(self) -> None:
        from ray.serve import metrics

        # Ray annotates tag_keys as Tuple[str] (one tag); any length works.
        Counter: Any = metrics.Counter
        Gauge: Any = metrics.Gauge
        Histogram: Any = metrics.Histogram

        by_request = ("model", "endpoint")
        self._requests = Counter(
            "llm_fleet_requests",
            description="Requests finished by the router.",
            tag_keys=("model", "endpoint", "status"),
        )
        self._rejections = Counter(
            "llm_fleet_rejections",
            description="Requests refused before reaching an engine.",
            tag_keys=("model", "reason"),
        )
        self._prompt_tokens = Counter(
            "llm_fleet_prompt_tokens", description="Prompt tokens.", tag_keys=("model",)
        )
        self._completion_tokens = Counter(
            "llm_fleet_completion_tokens", description="Completion tokens.", tag_keys=("model",)
        )
        self._ttft = Histogram(
            "llm_fleet_time_to_first_token_seconds",
            description="Streams: seconds from arrival at the router to the first frame.",
            boundaries=TTFT_BUCKETS,
            tag_keys=by_request,
        )
        self._itl = Histogram(
            "llm_fleet_inter_token_latency_seconds",
            description="Streams: mean seconds between frames, one sample per request.",
            boundaries=ITL_BUCKETS,
            tag_keys=by_request,
        )
        self._latency = Histogram(
            "llm_fleet_request_latency_seconds",
            description="Seconds from arrival at the router to the end of the answer.",
            boundaries=LATENCY_BUCKETS,
            tag_keys=by_request,
        )
        self._in_flight = Gauge(
            "llm_fleet_requests_in_flight",
            description="Requests this router replica is serving.",
            tag_keys=("model",),
        )
        self._disconnects = Counter(
            "llm_fleet_client_disconnects",
            description="Clients that left before their answer ended.",
            tag_keys=by_request,
        )
        self._after_disconnect = Counter(
            "llm_fleet_tokens_after_disconnect",
            description="Frames the engine sent for a request after its client had left.",
            tag_keys=("model",),
        )
        self._declare_model_gauges(Gauge)
        self._flying: Tally[str] = Tally()

    def _declare_model_gauges(self, Gauge: Any) -> None:
        """The gauges of each model's state, set from the status board."""
        self._ready = Gauge(
            "llm_fleet_model_ready", description="1 when a replica is running.", tag_keys=("model",)
        )
        self._replicas = Gauge(
            "llm_fleet_model_replicas",
            description="Replicas by state (running, starting).",
            tag_keys=("model", "state"),
        )
        self._min = Gauge(
            "llm_fleet_model_min_replicas", description="Configured floor.", tag_keys=("model",)
        )
        self._max = Gauge(
            "llm_fleet_model_max_replicas", description="Configured ceiling.", tag_keys=("model",)
        )

    def request_dispatched(self, record: RequestRecord) -> None:
        self._flying[record.model] += 1
        self._in_flight.set(self._flying[record.model], tags={"model": record.model})

    def request_finished(self, record: RequestRecord) -> None:
        model, endpoint = record.model, record.endpoint
        tags = {"model": model, "endpoint": endpoint}
        if record.dispatched_at is not None:
            self._flying[model] -= 1
            self._in_flight.set(self._flying[model], tags={"model": model})
        self._requests.inc(tags={**tags, "status": str(record.status)})
        if record.rejection is not None:
            self._rejections.inc(tags={"model": model, "reason": record.rejection})
        if record.prompt_tokens:
            self._prompt_tokens.inc(record.prompt_tokens, tags={"model": model})
        if record.completion_tokens:
            self._completion_tokens.inc(record.completion_tokens, tags={"model": model})
        self._latency.observe(record.latency_s, tags=tags)
        if (ttft := record.ttft_s) is not None:
            self._ttft.observe(ttft, tags=tags)
        if (itl := record.itl_s) is not None:
            self._itl.observe(itl, tags=tags)
        if record.disconnected:
            self._disconnects.inc(tags=tags)
            if record.tokens_after_disconnect:
                self._after_disconnect.inc(record.tokens_after_disconnect, tags={"model": model})

    def models_updated(self, statuses: Mapping[str, ModelStatus]) -> None:
        # Ray drops a gauge not set for two report intervals: refresh every poll, so an
        # idle model shows 0 in flight rather than no data.
        for model in statuses:
            self._in_flight.set(self._flying[model], tags={"model": model})
        for model, status in statuses.items():
            tags = {"model": model}
            self._ready.set(1 if status.state == "ready" else 0, tags=tags)
            self._replicas.set(status.running, tags={**tags, "state": "running"})
            self._replicas.set(status.starting, tags={**tags, "state": "starting"})
            self._min.set(status.min_replicas, tags=tags)
            self._max.set(status.max_replicas, tags=tags)
