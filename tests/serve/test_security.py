"""The local cluster ``make serve`` starts is reachable from this machine only, and Ray's
token auth is on: checked on the shared fleet, which the launcher started that way."""

from __future__ import annotations

import ipaddress

import httpx
import psutil
import pytest

from tests.serve.conftest import Fleet

pytestmark = [pytest.mark.serve, pytest.mark.slow]


def _listening(pid: int) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket of ``pid``'s tree."""
    root = psutil.Process(pid)
    tree = {p.pid: p for p in [root, *root.children(recursive=True)]}
    found = []
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in tree:
            found.append((conn.laddr.ip, conn.laddr.port, tree[conn.pid].name()))
    return found


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def test_every_port_of_the_local_cluster_listens_on_loopback_only(fleet: Fleet) -> None:
    """Loopback only, but for one server Ray Serve binds itself (see the README)."""
    listening = _listening(fleet.pid)
    names = {name for _, _, name in listening}
    # Not vacuous: Ray's control plane, the dashboard and Serve's HTTP proxy are there.
    assert {"gcs_server", "raylet"} <= names, listening
    ports = {port for _, port, _ in listening}
    assert 8265 in ports and int(fleet.base_url.rsplit(":", 1)[1]) in ports, listening
    exposed = [entry for entry in listening if not _is_loopback(entry[0])]
    # Each Serve replica's inter-deployment gRPC server: Ray hard-codes "[::]:0".
    assert all(name.startswith("ray::ServeReplica:") for _, _, name in exposed), exposed
    for _, port, name in exposed:
        assert _grpc_status_without_token(port) == "UNAUTHENTICATED", name


def _grpc_status_without_token(port: int) -> str:
    """Call a Serve replica's gRPC method as an outsider would: no cluster token."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(
            "/ray.serve.ASGIService/HandleRequest",
            request_serializer=lambda raw: raw,
            response_deserializer=lambda raw: raw,
        )
        try:
            call(b"", timeout=10)
        except grpc.RpcError as refused:
            return str(refused.code().name)
    return "OK"


@pytest.mark.parametrize("path", ["/api/version", "/api/jobs/", "/api/serve/applications/"])
def test_ray_dashboard_refuses_requests_without_the_cluster_token(fleet: Fleet, path: str) -> None:
    reply = httpx.get(f"http://127.0.0.1:8265{path}", timeout=10)
    assert reply.status_code == 401, reply.text
