"""API keys on real Ray Serve with two router replicas: one limit for the whole app,
and keys revoked or added while serving.

A second app ("limits", under /limits) joins the shared fleet's cluster: two router
replicas with a keys file, in front of two models:

- ``limited-model``, whose store cannot be reached: no engine ever starts, so an
  admitted request gets 503 (the model is scaled to zero, then failed) and a refused
  one 429, which is all rpm needs;
- ``limited-chat``, SmolLM2 on a real vLLM engine (one more engine start, about a
  minute): tokens per minute count what the engine really generated, and concurrency
  needs requests that really last. It is a ``direct: true`` model: its replicas are
  the ingress of a third app (``limits.limited-chat`` at ``/m/limited-chat``), which
  takes the same keys and counts them in the same limits actor (``router/direct.py``).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from llm_fleet.deployments.caller_watch import PERIOD_S as CALLER_CHECK_S
from llm_fleet.router.keys_file import KeysFile, create_key, load_keys, revoke_key, write_keys
from tests.serve.conftest import CHAT_MODEL, Fleet

pytestmark = [pytest.mark.serve, pytest.mark.slow]

APP = "limits"
MODEL = "limited-model"
REAL_MODEL = "limited-chat"
DIRECT_APP = f"{APP}.{REAL_MODEL}"
DIRECT_PREFIX = f"/m/{REAL_MODEL}"
RPM = 6
# With the limits actor the count is exact; the documented tolerance is for the moments
# a replica cannot reach it and counts alone.
RPM_TOLERANCE = 0
TPM = 300
CONCURRENCY = 2
# How long a dead router replica's concurrency slots stay counted (the default is 30 s).
LEASE_S = 6.0
READY_TIMEOUT_S = 600


@dataclass(frozen=True)
class LimitsApp:
    url: str
    keys_file: Path
    key_a: str
    key_b: str
    tpm_key: str
    conc_key: str
    lease_key: str
    direct_url: str  # limited-chat's direct path


@pytest.fixture(scope="module")
def limits_app(
    fleet: Fleet, ray_driver: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LimitsApp]:
    import ray
    from ray import serve

    from llm_fleet.router.builder import build_app, build_direct_app
    from llm_fleet.router.shared_quota import NAMESPACE, actor_name

    keys_file = tmp_path_factory.mktemp("keys") / "keys.yaml"
    key_a = create_key(keys_file, "team-a", models=[MODEL], rpm=RPM)
    key_b = create_key(keys_file, "team-b", models=[MODEL, REAL_MODEL], rpm=RPM)
    tpm_key = create_key(keys_file, "tokens", models=[REAL_MODEL], tpm=TPM)
    conc_key = create_key(keys_file, "parallel", models=[REAL_MODEL], concurrency=CONCURRENCY)
    lease_key = create_key(keys_file, "one-at-a-time", models=[REAL_MODEL], concurrency=1)
    args = {
        "router": {
            "num_cpus": 0.05,
            "autoscaling": {"min_replicas": 2, "max_replicas": 2},
            "keys_file": str(keys_file),
            "quota_lease_s": LEASE_S,
        },
        "models": [
            {
                "id": REAL_MODEL,
                "source": f"embedded://{CHAT_MODEL}",
                "engine_args": {
                    "max_model_len": 2048,
                    "max_num_seqs": 8,
                    "kv_cache_memory_bytes": 128 << 20,
                },
                "resources": {"num_cpus": 0.1},
                "autoscaling": {"min_replicas": 1, "max_replicas": 1},
                # A stream whose router was killed runs on: don't wait for it at the end.
                "graceful_shutdown_timeout_s": 5,
                "direct": True,
            },
            {
                "id": MODEL,
                "source": "s3://fleet-weights/nothing",
                "resources": {"num_cpus": 0.05},
                "autoscaling": {"min_replicas": 0, "initial_replicas": 0, "max_replicas": 1},
                "env": {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"},
            },
        ],
    }
    direct_args = {**args, "direct_model": REAL_MODEL}
    serve.run(build_direct_app(direct_args), name=DIRECT_APP, route_prefix=DIRECT_PREFIX)
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
    try:
        url = f"{fleet.base_url}/{APP}"
        _wait_ready(url)
        yield LimitsApp(
            url,
            keys_file,
            key_a,
            key_b,
            tpm_key,
            conc_key,
            lease_key,
            fleet.base_url + DIRECT_PREFIX,
        )
    finally:
        serve.delete(APP)
        serve.delete(DIRECT_APP)
        # The limits actor is detached: it outlives the app unless killed.
        ray.kill(ray.get_actor(actor_name(APP), namespace=NAMESPACE))


def _wait_ready(url: str) -> None:
    """/health/ready is 200 once the real model's engine runs (the other one starts at zero)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while httpx.get(f"{url}/health/ready", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "limited-chat did not start"
        time.sleep(2)


def _client(app: LimitsApp, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app.url}/v1", api_key=key, max_retries=0, timeout=120)


HELLO = [{"role": "user", "content": "Say hello."}]


def _tokens_used(client: openai.OpenAI, *, stream: bool) -> int:
    """Prompt + completion tokens of one real chat completion, as its usage reports them."""
    if not stream:
        reply = client.chat.completions.create(model=REAL_MODEL, messages=HELLO, max_tokens=16)
        assert reply.usage is not None
        return reply.usage.total_tokens
    chunks = client.chat.completions.create(
        model=REAL_MODEL,
        messages=HELLO,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [chunk.usage for chunk in chunks if chunk.usage is not None]
    assert len(usage) == 1
    return usage[0].total_tokens


def _long_stream(client: openai.OpenAI, max_tokens: int) -> openai.Stream[Any]:
    """A stream that lasts: the engine is told to ignore end-of-sequence."""
    return client.chat.completions.create(
        model=REAL_MODEL,
        messages=HELLO,
        max_tokens=max_tokens,
        stream=True,
        extra_body={"ignore_eos": True},
    )


def _all_at_once(clients: list[Callable[[], None]]) -> None:
    """Run each client in its own thread; back when all are done."""
    threads = [threading.Thread(target=client) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _chat(app: LimitsApp, key: str) -> httpx.Response:
    return httpx.post(
        f"{app.url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]},
        headers={"Authorization": f"Bearer {key}", "X-Request-Id": f"lim-{uuid.uuid4().hex}"},
        timeout=30,
    )


def test_two_router_replicas_admit_a_keys_rpm_once_in_total(limits_app: LimitsApp) -> None:
    from ray import serve

    router = serve.status().applications[APP].deployments["router"]
    assert router.replica_states.get("RUNNING", 0) == 2, router.replica_states
    statuses: list[httpx.Response] = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(6):
            reply = _chat(limits_app, limits_app.key_a)
            with lock:
                statuses.append(reply)

    _all_at_once([client] * 4)
    counts = Counter(reply.status_code for reply in statuses)
    admitted = sum(n for status, n in counts.items() if status != 429)
    assert RPM <= admitted <= RPM + RPM_TOLERANCE, counts
    assert counts[503] == admitted, counts  # no engine: admitted ones meet the failed model
    refused = [reply for reply in statuses if reply.status_code == 429]
    assert all(r.json()["error"]["code"] == "rate_limit_exceeded_rpm" for r in refused)
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    # Another key has its own minute.
    assert _chat(limits_app, limits_app.key_b).status_code == 503


def test_two_router_replicas_hold_a_keys_tokens_per_minute_in_total(limits_app: LimitsApp) -> None:
    """Two clients (one streaming) spend a 300 tpm key on the real engine until refused.

    A request is admitted while the minute's count is below the limit, and counted when
    it ends with what it used: in total, the limit plus at most the requests in flight
    at that moment (one per client). Counted per replica, it would be near twice that.
    """
    used: list[int] = []
    refusals: list[openai.RateLimitError] = []
    lock = threading.Lock()

    def spend(stream: bool) -> None:
        client = _client(limits_app, limits_app.tpm_key)
        for _ in range(40):
            try:
                tokens = _tokens_used(client, stream=stream)
            except openai.RateLimitError as refused:
                with lock:
                    refusals.append(refused)
                return
            with lock:
                used.append(tokens)

    _all_at_once([lambda: spend(stream=False), lambda: spend(stream=True)])
    print(f"tpm {TPM}: admitted {len(used)} requests using {sum(used)} tokens ({used})")
    assert len(refusals) == 2, used
    assert TPM <= sum(used) <= TPM + 2 * max(used), used
    for refused in refusals:
        assert refused.code == "rate_limit_exceeded_tpm"
        assert 1 <= int(refused.response.headers["retry-after"]) <= 60
    # The key's owner is told, another key is not touched.
    assert _tokens_used(_client(limits_app, limits_app.key_b), stream=False) > 0


def test_two_router_replicas_hold_a_keys_concurrency_in_total(limits_app: LimitsApp) -> None:
    """Six long streams start at once with a concurrency-2 key: exactly two run."""
    start = threading.Barrier(6)
    admitted: list[str] = []
    refusals: list[openai.RateLimitError] = []
    lock = threading.Lock()

    def open_stream() -> None:
        client = _client(limits_app, limits_app.conc_key)
        start.wait()
        try:
            stream = _long_stream(client, max_tokens=150)
        except openai.RateLimitError as refused:
            with lock:
                refusals.append(refused)
            return
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        with lock:
            admitted.append(text)

    _all_at_once([open_stream] * 6)
    assert len(admitted) == CONCURRENCY and all(admitted), (admitted, refusals)
    assert len(refusals) == 6 - CONCURRENCY
    for refused in refusals:
        assert refused.code == "concurrency_limit_exceeded"
        assert refused.response.headers["retry-after"] == "1"
    # Both slots came back when the streams ended, whichever replica served them.
    client = _client(limits_app, limits_app.conc_key)
    assert all(_tokens_used(client, stream=False) > 0 for _ in range(CONCURRENCY + 1))


def test_the_direct_path_takes_the_same_keys_and_limits(limits_app: LimitsApp) -> None:
    """/m/limited-chat/v1: no key is a 401, a key without the model a 404, and a key's
    concurrency is one count for both doors."""
    url = f"{limits_app.direct_url}/v1/chat/completions"
    body = {"model": REAL_MODEL, "messages": HELLO, "max_tokens": 4}
    anonymous = httpx.post(url, json=body, timeout=30)
    assert anonymous.status_code == 401, anonymous.text
    assert anonymous.json()["error"]["code"] == "invalid_api_key"
    assert anonymous.headers["x-request-id"]
    with pytest.raises(openai.NotFoundError):
        direct_a = openai.OpenAI(base_url=f"{limits_app.direct_url}/v1", api_key=limits_app.key_a)
        direct_a.chat.completions.create(model=REAL_MODEL, messages=HELLO, max_tokens=4)
    direct = openai.OpenAI(
        base_url=f"{limits_app.direct_url}/v1", api_key=limits_app.conc_key, max_retries=0
    )
    assert [m.id for m in direct.models.list()] == [REAL_MODEL]
    assert _tokens_used(direct, stream=True) > 0
    # Both of the key's slots taken through the router: the direct door refuses a third.
    routed = _client(limits_app, limits_app.conc_key)
    streams = [_long_stream(routed, max_tokens=400) for _ in range(CONCURRENCY)]
    try:
        for stream in streams:
            next(iter(stream))  # admitted and generating
        with pytest.raises(openai.RateLimitError) as refused:
            _tokens_used(direct, stream=False)
        assert refused.value.code == "concurrency_limit_exceeded"
    finally:
        for stream in streams:
            stream.close()
    # The slots come back once the router's streams are closed.
    deadline = time.monotonic() + 20
    while True:
        try:
            assert _tokens_used(direct, stream=False) > 0
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "the closed streams' slots never came back"
            time.sleep(0.5)


def _until_every_replica_answers(ask: Callable[[], list[int]], wanted: list[int]) -> None:
    """Both router replicas must have reloaded: ask several times, for up to 20 s."""
    deadline = time.monotonic() + 20
    while (replies := ask()) != wanted and time.monotonic() < deadline:
        time.sleep(1)
    assert replies == wanted


def test_keys_added_changed_and_revoked_while_serving(limits_app: LimitsApp) -> None:
    key_c = create_key(limits_app.keys_file, "team-c", models=[MODEL])
    revoke_key(limits_app.keys_file, "team-b")
    _until_every_replica_answers(
        lambda: [_chat(limits_app, k).status_code for k in [limits_app.key_b] * 4 + [key_c] * 4],
        [401] * 4 + [503] * 4,
    )
    # Changed by hand, as an operator edits the file: team-c loses limited-model.
    keys = load_keys(limits_app.keys_file)
    edited = [
        entry.model_copy(update={"models": [REAL_MODEL]}) if entry.name == "team-c" else entry
        for entry in keys.keys
    ]
    write_keys(limits_app.keys_file, KeysFile(keys=edited))
    _until_every_replica_answers(
        lambda: [_chat(limits_app, key_c).status_code for _ in range(4)], [404] * 4
    )


def _limits_snapshot() -> dict[str, Any]:
    import ray

    from llm_fleet.router.shared_quota import NAMESPACE, actor_name

    actor = ray.get_actor(actor_name(APP), namespace=NAMESPACE)
    snapshot: dict[str, Any] = ray.get(actor.snapshot.remote(), timeout=10)
    return snapshot


def test_a_dead_router_replicas_slot_and_generation_end(limits_app: LimitsApp) -> None:
    """A router replica killed mid-stream never releases its slot: the lease frees it.

    Nor does it cancel its stream: the model replica sees its caller gone and aborts
    the generation (deployments/caller_watch.py), long before max_tokens.
    """
    import ray
    from ray import serve

    client = _client(limits_app, limits_app.lease_key)
    stream = _long_stream(client, max_tokens=1500)  # a minute or more here
    next(iter(stream))  # running: the key's one slot is taken
    with pytest.raises(openai.RateLimitError) as refused:
        _tokens_used(client, stream=False)
    assert refused.value.code == "concurrency_limit_exceeded"
    key_id = _key_id(limits_app.keys_file, "one-at-a-time")
    holders = [h for h, n in _limits_snapshot()["keys"][key_id]["holders"].items() if n > 0]
    assert len(holders) == 1 and holders[0].startswith("SERVE_REPLICA::limits#router#")
    ray.kill(ray.get_actor(holders[0], namespace="serve"), no_restart=True)
    killed = time.monotonic()
    stream.close()
    statuses: list[str] = []
    while time.monotonic() - killed < LEASE_S * 3 + 20:
        try:
            _tokens_used(client, stream=False)
            break
        except openai.APIStatusError as error:  # 429 until the lease ends; 5xx while
            statuses.append(f"{error.status_code} {error.code}")  # Serve replaces the replica
        except openai.APIConnectionError as error:
            statuses.append(type(error).__name__)
        time.sleep(0.5)
    else:
        pytest.fail(f"the dead replica's slot never came back: {statuses}")
    waited = time.monotonic() - killed
    print(f"lease {LEASE_S} s: admitted again {waited:.1f} s after the kill; before: {statuses}")
    assert "429 concurrency_limit_exceeded" in statuses, statuses  # held, then freed
    assert waited <= LEASE_S + LEASE_S / 3 + 10, (waited, statuses)
    model = serve.get_deployment_handle(REAL_MODEL, app_name=DIRECT_APP)
    while model.num_unfinished_requests.remote().result() > 0:
        assert time.monotonic() - killed < CALLER_CHECK_S + 15, "the orphan stream runs on"
        time.sleep(0.5)
    print(f"orphan generation aborted within {time.monotonic() - killed:.1f} s of the kill")


def _key_id(keys_file: Path, name: str) -> str:
    from llm_fleet.router.keys_file import list_keys

    return next(key.id for key in list_keys(keys_file) if key.name == name)


def test_no_key_material_in_any_log(limits_app: LimitsApp) -> None:
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    secrets = [
        key.encode()
        for key in (
            limits_app.key_a,
            limits_app.key_b,
            limits_app.tpm_key,
            limits_app.conc_key,
            limits_app.lease_key,
        )
    ]
    leaked = [
        str(path)
        for path in logs.rglob("*")
        if path.is_file() and any(secret in path.read_bytes() for secret in secrets)
    ]
    assert not leaked, leaked
