"""The fleet-wide settings of the config schema: autoscaling (of models and router),
the router, the hop from model replicas to the router, and CPU binding
(``deployments/config.py`` holds the models' part and ``FleetConfig``).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AutoscalingConfig(StrictModel):
    """Ray Serve autoscaling for one deployment; defaults keep scaling alive."""

    min_replicas: int = Field(1, ge=0, description="Replicas kept even when idle (0 allowed).")
    max_replicas: int = Field(2, ge=1, description="Upper bound on replicas under load.")
    initial_replicas: int | None = Field(
        None, ge=0, description="Replicas at first deploy; defaults to min_replicas."
    )
    target_ongoing_requests: float = Field(
        8.0, gt=0, description="Ongoing requests per replica that autoscaling aims for."
    )
    upscale_delay_s: float = Field(
        30.0, ge=0, description="Seconds the load must stay high before adding replicas."
    )
    downscale_delay_s: float = Field(
        300.0, ge=0, description="Seconds the load must stay low before removing replicas."
    )
    look_back_period_s: float = Field(
        30.0, gt=0, description="Window over which the reported load is averaged."
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        initial = self.initial_replicas
        if initial is not None and not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self

    def to_serve(self) -> dict[str, Any]:
        """The dict Ray Serve's ``autoscaling_config`` takes."""
        return self.model_dump(exclude_none=True)


class CpuBindingConfig(StrictModel):
    """How CPU engine replicas get cores (``deployments/cpu_placement.py``).

    Ray's ``num_cpus`` is a count, not a set of cores, and vLLM's CPU build left to
    itself binds every engine on a node to the same first cores. With ``auto`` each CPU
    replica claims ``max(1, floor(resources.num_cpus))`` cores of its own on its node
    and binds its engine there (``VLLM_CPU_OMP_THREADS_BIND``); /health shows where. On
    GPUs nothing is bound: ``num_cpus`` is then what feeds the engine's scheduler and
    input processing.
    """

    mode: Literal["auto", "off"] = Field(
        "auto",
        description="'auto': each CPU engine replica claims cores of its own. 'off': vLLM "
        "binds as it would alone (every engine on a node takes the same cores).",
    )
    reserved_cores: int = Field(
        1,
        ge=0,
        description="The last cores of each node, left to Ray, the Serve proxy, the router "
        "and the engines' schedulers; engines claim the others (never fewer than one).",
    )


class StreamingConfig(StrictModel):
    """How a model replica's answer travels to the router (one Ray Serve handle call)."""

    handle_transport: Literal["actor", "grpc"] = Field(
        "grpc",
        description="'grpc': Serve's direct gRPC channel between replicas, items pickled by "
        "value (handle option _by_reference=False); measured 1.7x the zero-cost router's "
        "requests/s of 'actor'. 'actor': Ray's actor calls, each stream item through Ray's "
        "object store protocol (Serve's own default).",
    )
    coalesce_frames: bool = Field(
        False,
        description="Model replicas send the first frame of a stream at once and then, "
        "each time the router takes the next item, every frame already produced, joined "
        "into one item (no timer, so no added latency). Off by default: it only pays when "
        "replicas run user code on Serve's own loop, which Ray's defaults and ours leave "
        "off (README, Performance).",
    )


_RAY_BUILTIN_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}


def check_custom_resources(value: dict[str, float]) -> dict[str, float]:
    """Ray custom resources ``{name: amount}``: not one of Ray's own, a valid name, > 0."""
    for name, amount in value.items():
        if name in _RAY_BUILTIN_RESOURCES or name.startswith("accelerator_type:"):
            raise ValueError(
                f"custom resource {name!r} is one of Ray's own; set num_cpus, num_gpus "
                "or accelerator_type instead"
            )
        if not re.fullmatch(r"[A-Za-z0-9_.:/-]{1,128}", name):
            raise ValueError(f"custom resource name {name!r} is not a valid Ray resource name")
        if amount <= 0:
            raise ValueError(f"custom resource {name!r}: the amount must be > 0")
    return value


class RouterConfig(StrictModel):
    """The OpenAI-compatible ingress deployment."""

    autoscaling: AutoscalingConfig = Field(
        default_factory=lambda: AutoscalingConfig(
            min_replicas=1, max_replicas=4, target_ongoing_requests=200
        ),
        description="Autoscaling of router replicas; each one only relays, so it scales wide.",
    )
    num_cpus: float = Field(0.5, ge=0, description="CPUs reserved by each router replica.")
    custom_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources each router replica reserves, {name: amount}: "
        "keeps the router on the nodes that advertise them (CPU nodes, say, not the GPU "
        "nodes whose loss would take a router replica with it).",
    )
    max_replicas_per_node: int | None = Field(
        None,
        ge=1,
        le=100,
        description="Most router replicas on one node: 1 spreads them, so losing a node "
        "leaves the others answering.",
    )

    @field_validator("custom_resources")
    @classmethod
    def _custom_resources(cls, value: dict[str, float]) -> dict[str, float]:
        return check_custom_resources(value)

    max_ongoing_requests: int = Field(
        1000, ge=1, description="Concurrent requests (mostly open streams) per router replica."
    )
    cors_allowed_origins: list[str] = Field(
        default_factory=list,
        description="Origins allowed by CORS. Empty (the default) sends no CORS headers, so "
        "browsers on other origins cannot call the API; '*' allows every origin. "
        "CORS_ALLOWED_ORIGINS (comma-separated) overrides it.",
    )
    max_request_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest request body accepted; larger gets 413."
    )
    max_header_bytes: int = Field(
        32 * 1024,
        ge=1024,
        description="Largest total of request header names and values; larger gets 431.",
    )
    request_timeout_s: float | None = Field(
        600.0,
        gt=0,
        description="Longest a request may take, from arrival to its last byte: past it a "
        "whole answer is 504 request_timeout and a stream ends with that error frame, and "
        "the generation is aborted. null: no limit (max_tokens still bounds a generation).",
    )
    max_concurrent_requests: int | None = Field(
        None,
        ge=1,
        description="Inference requests in flight across the whole gateway (every router "
        "replica and direct door, counted in the app's limits actor); past it a request gets "
        "429 gateway_busy with Retry-After: 1. null: no gateway-wide cap. "
        "LLM_MAX_CONCURRENT_REQUESTS overrides it.",
    )
    status_poll_interval_s: float = Field(
        1.0,
        gt=0,
        le=30,
        description="How often each router replica reads the models' state (Ray Serve's "
        "replica states and the replicas' load phases) for /health, gating and metrics.",
    )
    expose_metrics: bool = Field(
        True,
        description="Serve GET /metrics on the gateway port: the Prometheus text of the node "
        "the answering router replica runs on. Off: 404.",
    )
    keys_file: str | None = Field(
        None,
        description="Absolute path of the API keys file (see router/keys_file.py), readable "
        "on every node that runs a router replica; re-read when it changes. With a file, "
        "every route but /health/* needs a valid key. With none, auth is off and the router "
        "logs a loud warning at startup. LLM_FLEET_KEYS_FILE overrides it.",
    )
    drain_dir: str | None = Field(
        None,
        description="Absolute path of a folder every router replica's node can read and "
        "write: the drain signal before a shutdown (see router/drain.py). A file 'draining' "
        "in it, holding the drain's end as Unix time, makes the routers refuse new requests "
        "(503 shutting_down) and give those in flight until that end. llm-fleet serve makes "
        "one and sets LLM_FLEET_DRAIN_DIR, which overrides this.",
    )
    quota_lease_s: float = Field(
        30.0,
        ge=3,
        le=3600,
        description="How long the app's limits actor keeps a router replica's concurrency "
        "slots without news from it. A replica renews its hold every quota_lease_s / 3 "
        "while it has requests in flight, so a replica that dies has its slots freed after "
        "at most this long; one cut off from the actor for longer loses its slots in the "
        "count, and a key may then briefly run more than its concurrency. The first "
        "replica to create the (detached) actor sets it: a change takes effect once that "
        "actor is killed.",
    )

    @field_validator("keys_file", "drain_dir")
    @classmethod
    def _absolute(cls, value: str | None, info: ValidationInfo) -> str | None:
        # Router replicas run on other nodes and in other working directories.
        if value is not None and not value.startswith("/"):
            raise ValueError(f"{info.field_name} must be an absolute path")
        return value
