"""TLS on gRPC: with a certificate and key set, a service speaks TLS only, and a client that
trusts the CA (TANDEM_TLS_CA_FILE) gets through with its token."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from services.cli.client import Clients
from services.cli.stack import Stack
from services.cli.targets import DEFAULT_PORTS
from services.gen.tandem.identity.v1 import identity_pb2, identity_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "tls.crt", directory / "tls.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
async def tls_stack(tmp_path: Path, nats_url: str, database_url: str) -> AsyncIterator[tuple[Stack, Path]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = _self_signed(tmp_path)
    env = {"TANDEM_TLS_CERT_FILE": str(cert), "TANDEM_TLS_KEY_FILE": str(key)}
    stack = Stack(
        tmp_path / "state",
        nats_url=nats_url,
        database_url=database_url,
        services=("identity",),
        extra_env=env,
    )
    await asyncio.to_thread(stack.start)
    try:
        yield stack, cert
    finally:
        await asyncio.to_thread(stack.stop)


async def test_grpc_with_tls(tls_stack: tuple[Stack, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    stack, cert = tls_stack
    monkeypatch.setenv("TANDEM_TLS_CA_FILE", str(cert))
    # Only identity runs here; the other stubs are never called.
    targets = {name: stack.targets["identity"] for name in DEFAULT_PORTS}
    async with Clients(targets, token=stack.admin_token) as clients:
        me = await clients.identity.WhoAmI(identity_pb2.WhoAmIRequest(), timeout=10)
    assert me.user_id == "admin"
    # Plaintext is refused: the handshake never completes.
    async with grpc.aio.insecure_channel(stack.targets["identity"]) as plain:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await identity_pb2_grpc.IdentityServiceStub(plain).WhoAmI(identity_pb2.WhoAmIRequest(), timeout=3)
    assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
