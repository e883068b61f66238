"""The real engine: vLLM's v1 ``AsyncLLM`` plus vLLM's own OpenAI serving layer.

This is the only module of llm-fleet that imports vLLM: its internal paths move
between releases, so a vLLM upgrade touches this file alone. Chat templates,
sampling parameters, stop, n, logprobs, response_format and tools are all vLLM's
code (``OpenAIServingChat`` / ``OpenAIServingCompletion``), not ours.

Supported: vLLM 0.26.0 to 0.32.0 (``make test`` runs 0.32.0, ``make test-vllm026``
0.26.0). Where a path moved between them, the 0.32 one is tried first.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from llm_fleet.deployments.config import ModelConfig
from llm_fleet.deployments.engine import (
    CONTEXT_LENGTH_EXCEEDED,
    AdapterLoadError,
    EngineDeadError,
    EngineInfo,
    Reply,
    Route,
    error_reply,
)

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)

CPU_ENGINE_DEFAULTS: dict[str, Any] = {
    # bf16 on CPU produces garbage text with vLLM's CPU kernels; eager loads ~4x faster.
    "dtype": "float32",
    "enforce_eager": True,
}


def engine_kwargs(model: ModelConfig, model_path: Path) -> dict[str, Any]:
    """The AsyncEngineArgs for ``model``: CPU defaults, then the config's own args."""
    defaults = {} if model.resources.uses_gpu else dict(CPU_ENGINE_DEFAULTS)
    kwargs: dict[str, Any] = {
        **defaults,
        **model.engine_args,
        "model": str(model_path),
        "served_model_name": [model.id],
        "tensor_parallel_size": model.resources.tensor_parallel_size,
        "trust_remote_code": model.trust_remote_code,
    }
    if model.resources.tensor_parallel_size > 1:
        kwargs.setdefault("distributed_executor_backend", "ray")
    if model.adapters:
        kwargs.setdefault("enable_lora", True)
        kwargs.setdefault("max_loras", min(4, len(model.adapters)))
        kwargs.setdefault("max_lora_rank", 16)
        # The adapters a replica keeps loaded (multiplexing) stay in vLLM's CPU cache.
        kwargs.setdefault("max_cpu_loras", max(kwargs["max_loras"], model.max_adapters_per_replica))
    return kwargs


def _error_reply(error: Any) -> Reply:
    """A vLLM ErrorResponse as a Reply; vLLM puts the HTTP status in ``error.code``.

    vLLM gives no code for a request over the context; its message (ours too, from
    :func:`_enforce_context_length`) names the context length, so this is where the
    error gets OpenAI's ``context_length_exceeded``: the router never reads wording.
    """
    info = error.error
    status = int(info.code) if isinstance(info.code, int) and 400 <= info.code < 600 else 500
    over = status < 500 and "context length" in str(info.message).lower()
    return error_reply(
        status,
        info.message,
        error_type=info.type,
        param=info.param,
        code=CONTEXT_LENGTH_EXCEEDED if over else None,
    )


def _validation_reply(exc: ValidationError) -> Reply:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": str(exc)}
    param = ".".join(str(part) for part in first.get("loc", ())) or None
    return error_reply(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param=param)


# The request fields that hold the output budget (a CompletionRequest has only the first).
_BUDGET_FIELDS = ("max_tokens", "max_completion_tokens")


def _enforce_context_length(serving: Any, render_name: str, max_model_len: int) -> None:
    """Reject prompt + max_tokens over the context, as the OpenAI API does.

    vLLM 0.32 silently shrinks ``max_tokens`` to the room left; vLLM 0.26 refuses, but
    blames the prompt (``param`` ``input_tokens`` or ``input_text``). We wrap the
    serving object's render step, which already holds the prompt's token ids, so the
    check costs no second tokenization; an ErrorResponse is a value that step may
    return. The step renders without the budget, so that either version holds the
    prompt alone to the context and the check below names ``max_tokens``.
    """
    render = getattr(serving, render_name)

    async def render_checked(request: Any) -> Any:
        wanted = getattr(request, "max_completion_tokens", None) or request.max_tokens
        budget = {name: getattr(request, name) for name in _BUDGET_FIELDS if hasattr(request, name)}
        for name in budget:
            setattr(request, name, None)
        try:
            result = await render(request)
        finally:
            for name, value in budget.items():
                setattr(request, name, value)
        if not isinstance(result, tuple | list):
            return result  # an ErrorResponse already
        inputs = result[1] if isinstance(result, tuple) else result
        if wanted is None:
            return result
        for engine_input in inputs:
            prompt_len = serving._extract_prompt_len(engine_input)
            if prompt_len + wanted > max_model_len:
                return serving.create_error_response(
                    f"This model's maximum context length is {max_model_len} tokens. However, "
                    f"you requested {prompt_len + wanted} tokens ({prompt_len} in the prompt, "
                    f"{wanted} in the completion). Please reduce the length of the prompt or "
                    "max_tokens.",
                    param="max_tokens",
                )
        return result

    setattr(serving, render_name, render_checked)


def _ray_stat_loggers() -> list[Any] | None:
    """vLLM's own metrics, exported the Ray way when inside a Serve replica.

    ``RayPrometheusStatLogger`` records vLLM's Prometheus metrics (running/waiting
    requests, KV cache usage, prefix cache hits, TTFT, ITL, tokens) as Ray metrics
    tagged with the Serve ``ReplicaId``, so each node's metrics port serves them and a
    cluster scrape counts each engine once. Outside Serve, vLLM's default logger stays.
    """
    from ray import serve
    from ray.serve.exceptions import RayServeException
    from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

    try:
        serve.get_replica_context()
    except RayServeException:
        return None
    return [RayPrometheusStatLogger]


class VLLMEngine:
    """An ``LLMEngine`` backed by vLLM; see ``deployments/engine.py`` for the contract."""

    def __init__(self, model: ModelConfig, model_path: Path):
        self._model = model
        self._model_path = model_path
        self._client: AsyncLLM | None = None
        self._chat: Any = None
        self._completion: Any = None
        self._models: Any = None  # vLLM's OpenAIServingModels: the base model and the LoRAs

    async def start(self) -> EngineInfo:
        from starlette.datastructures import State
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        try:
            from vllm.entrypoints.launchers.api_server.app_state import init_app_state
            from vllm.entrypoints.launchers.cli_args import FrontendArgs
        except ImportError:  # vLLM 0.26
            from vllm.entrypoints.openai.api_server import init_app_state
            from vllm.entrypoints.openai.cli_args import FrontendArgs  # type: ignore[no-redef]

        kwargs = engine_kwargs(self._model, self._model_path)
        engine_args = AsyncEngineArgs(**kwargs)
        vllm_config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
        if self._model.resources.tensor_parallel_size > 1:
            from ray.util import get_current_placement_group

            # The replica's placement group holds one GPU bundle per shard.
            vllm_config.parallel_config.placement_group = get_current_placement_group()
        self._client = AsyncLLM.from_vllm_config(
            vllm_config,
            usage_context=UsageContext.OPENAI_API_SERVER,
            stat_loggers=_ray_stat_loggers(),
            disable_log_stats=bool(kwargs.get("disable_log_stats", False)),
        )
        args = argparse.Namespace(**(vars(FrontendArgs()) | vars(engine_args)))
        state = State()
        tasks = await self._client.get_supported_tasks()
        await init_app_state(self._client, state, args, supported_tasks=tasks)
        self._models = state.openai_serving_models
        self._chat = getattr(state, "openai_serving_chat", None)
        self._completion = getattr(state, "openai_serving_completion", None)
        max_len = int(vllm_config.model_config.max_model_len)
        if self._chat is not None:
            _enforce_context_length(self._chat, "render_chat_request", max_len)
        if self._completion is not None:
            _enforce_context_length(self._completion, "render_completion_request", max_len)
        logger.info("vLLM engine for %s ready (max_model_len=%d)", self._model.id, max_len)
        return EngineInfo(model_id=self._model.id, max_model_len=max_len)

    async def generate(
        self, route: Route, body: dict[str, Any], request_id: str
    ) -> AsyncGenerator[str | Reply, None]:
        from vllm import exceptions
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        try:
            from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        except ImportError:  # vLLM 0.26
            from vllm.entrypoints.openai.engine.protocol import (  # type: ignore[no-redef]
                ErrorResponse,
            )
        # vLLM 0.26 has no VLLMClientError: its client errors are ValueErrors.
        client_error = getattr(exceptions, "VLLMClientError", ValueError)

        serving = self._chat if route == "chat" else self._completion
        if serving is None:
            message = f"model {self._model.id!r} does not support /v1/{route}"
            yield error_reply(400, message, param="model")
            return
        request_cls = ChatCompletionRequest if route == "chat" else CompletionRequest
        try:
            request = request_cls.model_validate({**body, "request_id": request_id})
        except ValidationError as exc:
            yield _validation_reply(exc)
            return
        create = serving.create_chat_completion if route == "chat" else serving.create_completion
        self._raise_if_dead()
        try:
            result = await create(request, raw_request=None)
        except (ValueError, client_error) as exc:
            # vLLM maps its client errors (e.g. an invalid sampling parameter) to a status.
            yield _error_reply(serving.create_error_response(exc))
            return
        except Exception:
            self._raise_if_dead()  # vLLM's own EngineDeadError, as the contract's
            raise
        if isinstance(result, ErrorResponse):
            # vLLM's serving layer answers a dead engine with a 500 body: tell it apart.
            self._raise_if_dead()
            yield _error_reply(result)
        elif isinstance(result, AsyncGenerator):
            async for frame in result:
                yield frame
        else:
            yield Reply(status=200, body=result.model_dump(mode="json"))

    async def load_adapter(self, adapter_id: str, path: Path) -> None:
        """Through vLLM's serving layer (what its /v1/load_lora_adapter does): the chat
        and completion layers then serve ``model: adapter_id`` with the LoRA."""
        try:
            from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest
        except ImportError:  # vLLM 0.26
            from vllm.entrypoints.openai.protocol import (  # type: ignore[no-redef]
                LoadLoRAAdapterRequest,
            )
        request = LoadLoRAAdapterRequest(lora_name=adapter_id, lora_path=str(path))
        result = await self._models.load_lora_adapter(request)
        if not isinstance(result, str):  # an ErrorResponse
            raise AdapterLoadError(f"adapter {adapter_id!r}: {result.error.message}")

    async def unload_adapter(self, adapter_id: str) -> None:
        try:
            from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest
        except ImportError:  # vLLM 0.26
            from vllm.entrypoints.openai.protocol import (  # type: ignore[no-redef]
                UnloadLoRAAdapterRequest,
            )
        result = await self._models.unload_lora_adapter(
            UnloadLoRAAdapterRequest(lora_name=adapter_id)
        )
        if not isinstance(result, str):
            logger.warning("unloading adapter %s: %s", adapter_id, result.error.message)

    def _raise_if_dead(self) -> None:
        """EngineDeadError if vLLM's engine core died (``AsyncLLM.errored``): the
        replica answers 503 and fails its health check, and Serve replaces it."""
        if self._client is not None and self._client.errored:
            raise EngineDeadError(f"vLLM engine dead: {self._client.dead_error!r}")

    async def check_health(self) -> None:
        if self._client is None:
            raise RuntimeError("engine not started")
        await self._client.check_health()

    async def num_unfinished_requests(self) -> int:
        if self._client is None:
            return 0
        # AsyncLLM's own method (0.32) only forwards here; vLLM 0.26 lacks it.
        processor: Any = self._client.output_processor
        return int(processor.get_num_unfinished_requests())

    async def shutdown(self) -> None:
        if self._client is not None:
            self._client.shutdown()
            self._client = None
