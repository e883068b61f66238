"""The schema of the app's ``args``: one pydantic model, validated once in the builder.

The models' part is here; the router's, the streaming hop's and CPU binding's settings
are in ``deployments/fleet_settings.py``.

Every field has a description; ``extra="forbid"`` everywhere, so a typo in a YAML key
is an error that names its path, not a silently ignored setting.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from llm_fleet.deployments.cpu_placement import CORE_LIST_PATTERN
from llm_fleet.deployments.fleet_settings import (
    AutoscalingConfig,
    CpuBindingConfig,
    RouterConfig,
    StreamingConfig,
    StrictModel,
    check_custom_resources,
)

__all__ = [
    "AdapterConfig",
    "AutoscalingConfig",
    "CpuBindingConfig",
    "FleetConfig",
    "ModelConfig",
    "RequestLimits",
    "RouterConfig",
    "StreamingConfig",
]

MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
SOURCE_SCHEMES = ("embedded://", "s3://", "hf://", "file://", "/")
# Engine args the schema owns elsewhere: two places to set one thing is a bug magnet.
_RESERVED_ENGINE_ARGS = {
    "model": "source",
    "served_model_name": "id",
    "tensor_parallel_size": "resources.tensor_parallel_size",
    "trust_remote_code": "trust_remote_code",
}
_HF_COMMIT = re.compile(r"@[0-9a-f]{40}$")


class ResourcesConfig(StrictModel):
    """What one replica of a model reserves from the Ray cluster."""

    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved by the replica actor.")
    num_gpus: float = Field(
        0.0,
        ge=0,
        description="GPUs per replica. 0 runs the CPU build of vLLM (float32, eager by default).",
    )
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="GPUs one engine shards the model over; >1 reserves a placement group "
        "of that many one-GPU bundles, packed on one node.",
    )
    accelerator_type: str | None = Field(
        None, description="Ray accelerator type to pin replicas to, e.g. 'H100'."
    )
    cpu_cores: str | None = Field(
        None,
        pattern=CORE_LIST_PATTERN,
        description="CPU engines only: the cores every replica of this model binds its "
        "OpenMP threads to, in vLLM's syntax ('0-3', '4,6'). Unset: each replica claims "
        "cores of its own on its node (see cpu_binding). Set it only for models with one "
        "replica per node.",
    )

    custom: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources each replica reserves, {name: amount}: a replica "
        "only starts on a node that advertises them (ray start --resources='{\"llm\": 1}', "
        "or rayStartParams on KubeRay), e.g. to keep a model on one node pool.",
    )
    max_replicas_per_node: int | None = Field(
        None,
        ge=1,
        le=100,
        description="Most replicas of this model on one node; more replicas spread to "
        "other nodes (Ray Serve's max_replicas_per_node). Not with tensor_parallel_size > 1.",
    )
    placement_strategy: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] | None = Field(
        None,
        description="tensor_parallel_size > 1 only: how the replica's placement group of "
        "one-GPU bundles is placed (Ray's strategies). Default STRICT_PACK (all shards on one "
        "node, what tensor parallelism needs).",
    )

    @model_validator(mode="after")
    def _tp_needs_gpus(self) -> ResourcesConfig:
        if self.tensor_parallel_size > 1 and self.num_gpus == 0:
            raise ValueError("tensor_parallel_size > 1 needs num_gpus > 0")
        if self.cpu_cores is not None and self.num_gpus > 0:
            raise ValueError("cpu_cores binds a CPU engine; this model runs on GPUs")
        if self.tensor_parallel_size > 1 and self.max_replicas_per_node is not None:
            raise ValueError(
                "max_replicas_per_node cannot be combined with tensor_parallel_size > 1 "
                "(Ray Serve refuses it with a placement group)"
            )
        if self.placement_strategy is not None and self.tensor_parallel_size == 1:
            raise ValueError(
                "placement_strategy places a tensor_parallel_size > 1 replica's GPU bundles; "
                "to spread one-engine replicas over nodes set max_replicas_per_node"
            )
        return self

    @field_validator("custom")
    @classmethod
    def _custom_names(cls, value: dict[str, float]) -> dict[str, float]:
        return check_custom_resources(value)

    @property
    def uses_gpu(self) -> bool:
        return self.num_gpus > 0


class RequestLimits(StrictModel):
    """Per-model limits on what one request may ask of the engine, enforced by the router
    before the engine sees it: the output token policy, and a cap on every field that
    multiplies the work (sequences, logprobs, stop strings, messages, tools, a batch of
    prompts). Over a cap is a 400 naming the field and the limit (code
    ``request_limit_exceeded``). The defaults admit what OpenAI's API admits, bounded.
    """

    default_max_tokens: int = Field(
        256, ge=1, description="max_tokens applied when the client sends none."
    )
    max_tokens_limit: int = Field(
        4096,
        ge=1,
        description="Hard cap: a request asking for more max_tokens gets 400 naming this limit.",
    )
    max_n: int = Field(
        8, ge=1, description="Most sequences one request may ask for: caps n and best_of."
    )
    max_logprobs: int = Field(
        20, ge=0, description="Cap on top_logprobs (chat) and logprobs (completions)."
    )
    max_stop_sequences: int = Field(16, ge=0, description="Most stop strings in one request.")
    max_stop_length: int = Field(256, ge=1, description="Longest stop string, in characters.")
    max_messages: int = Field(2048, ge=1, description="Most messages in one chat request.")
    max_tools: int = Field(128, ge=0, description="Most tools (functions) in one chat request.")
    max_prompts: int = Field(
        16, ge=1, description="Most prompts in one completions request (a batch of prompts)."
    )

    @model_validator(mode="after")
    def _default_within_limit(self) -> RequestLimits:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError("default_max_tokens must not exceed max_tokens_limit")
        return self


class SamplingDefaults(StrictModel):
    """Sampling values a request gets when it sends none (every route, ``/v1`` and
    ``/api``). Unset: vLLM's default, the model's own ``generation_config.json``.
    ``LLM_DEFAULT_TEMPERATURE`` / ``LLM_DEFAULT_TOP_P`` fill these in for every model
    that sets none; a model's own value wins."""

    temperature: float | None = Field(
        None, ge=0, le=2, description="temperature when the request sends none."
    )
    top_p: float | None = Field(None, gt=0, le=1, description="top_p when the request sends none.")

    def apply(self, body: dict[str, Any]) -> dict[str, Any]:
        """``body`` with the unset fields filled (the same object when none is)."""
        missing = {
            name: value
            for name, value in (("temperature", self.temperature), ("top_p", self.top_p))
            if value is not None and body.get(name) is None
        }
        return {**body, **missing} if missing else body


class UnavailablePolicy(StrictModel):
    """What a request gets while its model has no ready replica.

    That is while the model downloads or loads, while it is scaled to zero, and after
    it failed to start. Either way a request for a model scaled to zero asks Ray Serve
    for a replica, so the model comes back.
    """

    action: Literal["reject", "queue"] = Field(
        "reject",
        description="'reject': answer 503 with Retry-After at once. 'queue': hold the request "
        "until a replica is ready, at most queue_timeout_s, then 503. A model that failed "
        "to start is answered 503 at once either way.",
    )
    retry_after_s: int = Field(
        15, ge=1, description="The Retry-After (seconds) sent with those 503 answers."
    )
    queue_timeout_s: float = Field(
        300.0, gt=0, description="With action 'queue': the longest a request waits for a replica."
    )


def _check_source(value: str) -> str:
    if not value.startswith(SOURCE_SCHEMES):
        raise ValueError(f"source must start with one of {', '.join(SOURCE_SCHEMES)}")
    if value.startswith("hf://") and not re.fullmatch(r"hf://[^/@\s]+/[^/@\s]+(@\S+)?", value):
        raise ValueError("hf:// sources look like hf://org/name@revision")
    if value.startswith("s3://") and not re.fullmatch(r"s3://[a-z0-9.\-]{3,63}(/\S*)?", value):
        raise ValueError("s3:// sources look like s3://bucket/prefix")
    return value


class AdapterConfig(StrictModel):
    """A LoRA adapter of its model, served under its own id on the model's replicas."""

    id: str = Field(
        pattern=MODEL_ID_PATTERN,
        description="The name clients send as 'model' for this adapter; listed in /v1/models.",
    )
    source: str = Field(
        description="Where the adapter comes from (PEFT's adapter_config.json and "
        "adapter_model.safetensors): 's3://bucket/prefix', 'hf://org/name@revision', or a "
        "local folder. Checked as the model's own weights are (its require_checksums, "
        "allow_moving_revision and allow_pickle).",
    )

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if value.startswith("embedded://"):
            raise ValueError("an adapter's source is s3://, hf:// or a local folder")
        return _check_source(value)


class PrefixAffinity(StrictModel):
    """Prefix-affine routing: requests whose prompts start alike go to the same replica,
    so vLLM's prefix cache holds their shared start (a system prompt, a conversation so
    far). The router hashes the first ``prefix_chars`` characters of the messages (or the
    prompt) into the handle call's session id; Ray Serve's ``ConsistentHashRouter`` maps
    it to a replica on a hash ring, trying ``fallback_replicas`` others when that one is
    full. Off by default: see README, Performance, for what it measured here."""

    enabled: bool = Field(False, description="Route by the prompt's start (see above).")
    prefix_chars: int = Field(
        4096,
        ge=64,
        description="Characters of the prompt's start (roles and contents of the messages, "
        "in order; or the prompt) that pick the replica.",
    )
    fallback_replicas: int = Field(
        2,
        ge=0,
        description="Replicas tried, in ring order, when the chosen one is at "
        "max_ongoing_requests (0: wait for it).",
    )


class ModelConfig(StrictModel):
    """One served model: its weights, engine, replicas and limits."""

    id: str = Field(
        pattern=MODEL_ID_PATTERN,
        description="The name clients send as 'model'; also the Ray Serve deployment name.",
    )
    source: str = Field(
        description="Where the weights come from: 'embedded://<id>', 's3://bucket/prefix', "
        "'hf://org/name@revision', or a local folder ('/abs/path' or 'file:///abs/path').",
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="vLLM engine arguments (AsyncEngineArgs names), e.g. max_model_len, "
        "gpu_memory_utilization, dtype. On CPU, dtype=float32 and enforce_eager=true are "
        "the defaults unless set here.",
    )
    resources: ResourcesConfig = Field(
        default_factory=ResourcesConfig, description="Resources reserved per replica."
    )
    autoscaling: AutoscalingConfig = Field(
        default_factory=AutoscalingConfig, description="Replica autoscaling for this model."
    )
    limits: RequestLimits = Field(
        default_factory=RequestLimits,
        description="What one request may ask: output tokens and the fields that multiply work.",
    )
    max_ongoing_requests: int = Field(
        64, ge=1, description="Requests one replica runs at once (the engine batches them)."
    )
    max_queued_requests: int = Field(
        256,
        ge=1,
        description="Requests each caller queues for this model before answering 503.",
    )
    graceful_shutdown_timeout_s: float = Field(
        120.0, gt=0, description="How long a replica being removed may finish its requests."
    )
    health_check_period_s: float = Field(
        10.0, gt=0, description="Seconds between engine health checks."
    )
    health_check_timeout_s: float = Field(
        30.0, gt=0, description="A health check slower than this marks the replica unhealthy."
    )
    sampling: SamplingDefaults = Field(
        default_factory=SamplingDefaults,
        description="temperature / top_p for requests that send none.",
    )
    unavailable: UnavailablePolicy = Field(
        default_factory=UnavailablePolicy,
        description="Requests while the model has no ready replica: reject (503) or queue.",
    )
    allow_pickle: bool = Field(
        False,
        description="Load pickle weights (*.bin, *.pt, *.pth), which can run code when "
        "loaded. Off: only safetensors are loaded.",
    )
    require_checksums: bool = Field(
        True,
        description="Refuse files the store gives no checksum for (S3 without a "
        "MANIFEST.sha256 entry). Every file with a checksum is verified before the engine starts.",
    )
    allow_moving_revision: bool = Field(
        False,
        description="Allow an hf:// source without a 40-hex commit revision (a branch or tag "
        "that can change under a running fleet).",
    )
    trust_remote_code: bool = Field(
        False, description="Let vLLM run Python code shipped with the model repository."
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Extra environment for this model's replicas (not for secrets), "
        "e.g. VLLM_CPU_OMP_THREADS_BIND.",
    )
    generate_route: Literal["chat", "completions"] = Field(
        "chat",
        description="Where /api/generate sends a prompt: 'chat' as one user message through "
        "the model's chat template (instruct models), 'completions' as a raw prompt "
        "to continue (base models).",
    )
    direct: bool = Field(
        False,
        description="Also serve this model at its own URL, /m/<id>/v1, from the model "
        "replica itself (API keys and limits included), skipping the router hop. The "
        "engine then lives in a second Serve application, '<fleet app>.<id>' with "
        "import_path llm_fleet.router.builder:build_direct_app, which the config file must list; "
        "the router reaches the same replicas (README, Direct path).",
    )

    adapters: list[AdapterConfig] = Field(
        default_factory=list,
        description="LoRA adapters served on this model's replicas, each under its own id "
        "(vLLM's LoRA: enable_lora is set, max_loras defaults to min(4, adapters), "
        "max_lora_rank to 16; set them in engine_args). A replica loads an adapter on its "
        "first request and Serve's multiplexing sends that adapter's next requests to "
        "replicas that have it loaded.",
    )
    prefix_affinity: PrefixAffinity = Field(
        default_factory=PrefixAffinity,
        description="Send requests that share a prompt start to the same replica.",
    )
    max_adapters_per_replica: int = Field(
        8,
        ge=1,
        description="Adapters one replica keeps loaded; past it the least recently used one "
        "is unloaded (Serve's multiplexing).",
    )

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        return _check_source(value)

    @model_validator(mode="after")
    def _pinned_revision(self) -> ModelConfig:
        for source in [self.source, *(a.source for a in self.adapters)]:
            moving = source.startswith("hf://") and not _HF_COMMIT.search(source)
            if moving and not self.allow_moving_revision:
                raise ValueError(
                    "hf:// sources need a pinned commit (hf://org/name@<40-hex sha>); "
                    "set allow_moving_revision: true to follow a branch or tag"
                )
        ids = [self.id, *(a.id for a in self.adapters)]
        if len({i.lower() for i in ids}) != len(ids):
            raise ValueError("adapter ids must differ from each other and from the model's id")
        return self

    def adapter(self, adapter_id: str) -> AdapterConfig | None:
        return next((a for a in self.adapters if a.id == adapter_id), None)

    def adapter_views(self) -> dict[str, ModelConfig]:
        """Each adapter as the router serves it: this model's settings (limits, sampling,
        availability) under the adapter's id."""
        return {
            a.id: self.model_copy(update={"id": a.id, "adapters": [], "direct": False})
            for a in self.adapters
        }

    @field_validator("engine_args")
    @classmethod
    def _no_reserved_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key, owner in _RESERVED_ENGINE_ARGS.items():
            if key in value:
                raise ValueError(f"engine_args.{key} is set by '{owner}'; set it there")
        return value


class FleetConfig(StrictModel):
    """The whole app: the models to serve and the router in front of them."""

    models: list[ModelConfig] = Field(
        default_factory=list,
        description="The models served from this app. LLM_ALLOWED_MODELS narrows this list. "
        "Empty in a router app whose models are apps of their own (import_path "
        "llm_fleet.router.builder:build_model_app, one model each): the router follows them.",
    )
    router: RouterConfig = Field(
        default_factory=RouterConfig, description="Router (ingress) settings."
    )
    streaming: StreamingConfig = Field(
        default_factory=StreamingConfig,
        description="The hop between model replicas and the router (see README, Performance).",
    )
    cpu_binding: CpuBindingConfig = Field(
        default_factory=CpuBindingConfig,
        description="Cores for CPU engine replicas: each one its own, reported in /health.",
    )
    log_format: Literal["json", "pretty"] | None = Field(
        None,
        description="The log lines of the router and model replicas: 'json' (one object per "
        "line, for log shippers) or 'pretty' (Serve's text lines). Set, it is every llm-fleet "
        "deployment's Serve logging_config (encoding, and Serve's access log off: the "
        "router writes its own line). null: the app's logging_config in the Serve config "
        "file decides. LOG_FORMAT overrides it.",
    )

    @field_validator("models")
    @classmethod
    def _unique_ids(cls, value: list[ModelConfig]) -> list[ModelConfig]:
        seen: set[str] = set()
        for model in value:
            for served in [model.id, *(a.id for a in model.adapters)]:
                if served.lower() in seen:
                    raise ValueError(f"model id {served!r} is configured twice")
                seen.add(served.lower())
            if model.id.lower() == "router":
                raise ValueError("model id 'router' is reserved for the ingress deployment")
        return value

    def model(self, model_id: str) -> ModelConfig | None:
        return next((m for m in self.models if m.id == model_id), None)
