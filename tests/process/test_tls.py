"""HTTPS from the older service's variables, end to end: ``llm-fleet serve``'s launcher
with ``SERVER_SSL_ENABLED=true``, ``TLS_SERVER_CERT_PATH`` / ``TLS_SERVER_KEY_PATH`` (a
throwaway CA's server certificate for 127.0.0.1) and ``LLM_INFERENCE_PORT`` over the
file's port. The official ``openai`` client trusting that CA gets a chat completion;
plain HTTP on that port, a client that does not trust the CA and the file's own port
get no answer; after SIGTERM no process of the launcher's tree is left.

It starts its own local Ray cluster (``launcher_run.py``): ``make test`` runs it in
the second pytest, with no other cluster (``-m own_cluster``).
"""

from __future__ import annotations

import re
import signal
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from llm_fleet.cli.listen import CERT_ENV, KEY_ENV, PORT_ENV, TLS_ENV
from tests.process.launcher_run import (
    Launched,
    fake_fleet_config,
    launched,
    process_tree,
    wait_gone,
    wait_ready,
)
from tests.tls_files import TlsFiles, make_tls_files

pytestmark = [pytest.mark.own_cluster, pytest.mark.slow]

FILE_PORT, PORT = 8125, 8124  # the file says one, LLM_INFERENCE_PORT the other
URL = f"https://127.0.0.1:{PORT}"
STOP_S = 60


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def trusting(tls: TlsFiles) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tls.ca))


@pytest.fixture(scope="module")
def launcher(tls: TlsFiles, trusting: ssl.SSLContext) -> Iterator[Launched]:
    env = {TLS_ENV: "true", CERT_ENV: str(tls.cert), KEY_ENV: str(tls.key), PORT_ENV: str(PORT)}
    with launched(fake_fleet_config(FILE_PORT), grace_s=5, env=env) as running:
        ready = wait_ready(running, f"{URL}/health/ready", 300, verify=trusting)
        assert ready, f"not ready over HTTPS (log: {running.log})"
        yield running


def test_the_openai_client_trusting_the_ca_gets_a_chat_completion(
    launcher: Launched, trusting: ssl.SSLContext
) -> None:
    with httpx.Client(verify=trusting) as http:
        client = openai.OpenAI(base_url=f"{URL}/v1", api_key="unused", http_client=http)
        reply = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "a b c"}], max_tokens=5
        )
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")


def _answer(url: str, verify: ssl.SSLContext | bool = True) -> str:
    try:
        said = f"status {httpx.get(url, timeout=10, verify=verify).status_code}"
    except httpx.HTTPError as exc:
        said = f"no answer: {exc!r}"
    print(f"{url}: {said}")
    return said


def test_plain_http_on_the_https_port_gets_no_answer(launcher: Launched) -> None:
    said = _answer(f"http://127.0.0.1:{PORT}/health/ready")
    assert said.startswith("no answer"), said


def test_a_client_that_does_not_trust_the_ca_refuses_the_server(launcher: Launched) -> None:
    said = _answer(f"{URL}/health/ready")
    assert said.startswith("no answer") and "CERTIFICATE_VERIFY_FAILED" in said, said


def test_the_variable_replaced_the_files_port(launcher: Launched, trusting: ssl.SSLContext) -> None:
    said = _answer(f"https://127.0.0.1:{FILE_PORT}/health/ready", verify=trusting)
    assert said.startswith("no answer: ConnectError"), said


def test_sigterm_stops_everything_and_removes_the_derived_config(launcher: Launched) -> None:
    tree = process_tree(launcher)
    signalled = time.monotonic()
    launcher.process.send_signal(signal.SIGTERM)
    code, took_s, left = wait_gone(launcher, tree, signalled)
    log = launcher.log.read_text()
    assert code == 0, log[-2000:]
    assert left == [], f"processes left after the launcher's exit: {left}"
    assert took_s <= STOP_S
    derived = re.search(r"with the environment's http_options: (\S+)\)", log)
    assert derived, log[-2000:]
    assert not Path(derived[1]).exists()
