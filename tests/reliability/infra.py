"""Throwaway infrastructure for fault injection: a Redis and a PostgreSQL cluster of the test's own, on free
ports in temporary directories, that the test may kill and restart at will. The shared Redis (6379),
PostgreSQL (5432) and RabbitMQ are never restarted or flushed: only our own processes are signalled."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from reviewapp.celery import app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"process on port {port} did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.05)


class ThrowawayRedis:
    """A redis-server without persistence (``--save "" --appendonly no``): a restart loses every key."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = self.dir / "redis.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.dir),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_port(self.port, self.proc, self.log)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        found = [p for p in [shutil.which(name)] if p]
    if not found:
        pytest.fail(f"PostgreSQL server binary {name} not found (install postgresql)")
    return found[-1]


class ThrowawayPostgres:
    """A PostgreSQL cluster of our own (initdb in a temp dir, trust auth, a free port). PostgreSQL refuses to
    run as root, so as root the cluster belongs to the ``postgres`` OS user and is driven through runuser."""

    def __init__(self) -> None:
        # Directly under /tmp (world-traversable), so that the postgres user can reach it when we are root.
        self.dir = Path(tempfile.mkdtemp(prefix="reviewapp-chaos-pg-"))
        workdir = self.dir
        self.data = workdir / "data"
        self.log = workdir / "postgres.log"
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            self.as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([*self.as_user, *args], capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            pytest.fail(
                f"{args[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}\n"
                f"{self.log.read_text()[-2000:] if self.log.exists() else ''}"
            )
        return result

    def init(self) -> None:
        if self.as_user:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run(
            _pg_bin("initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--no-instructions",
        )

    def start(self) -> None:
        # No unix socket in the temp dir (its path could exceed the limit); TCP only, fsync off for speed.
        options = f"-p {self.port} -k '' -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=60"
        self._run(
            _pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start"
        )

    def stop(self, mode: str = "fast") -> None:
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{dbname}"


def _refresh_router() -> None:
    app.amqp.flush_routes()
    app.amqp.__dict__.pop("router", None)  # a cached_property holding the old routes


@contextmanager
def producer_on(broker_url: str, routes: dict | None = None) -> Iterator[None]:
    """Point this process's Celery producer (send_task, the reconcilers, control/ping) at another broker for
    the duration. Celery reads CELERY_BROKER_URL from the environment before its own settings, so both are
    switched; the app's pooled connections are re-resolved on entry and exit."""
    saved_env = os.environ.get("CELERY_BROKER_URL")
    # Configured from Django settings under the CELERY namespace, the prefixed keys are the ones read.
    keys = ("CELERY_BROKER_URL", "CELERY_TASK_ROUTES", "CELERY_BROKER_TRANSPORT_OPTIONS")
    saved = {key: app.conf.get(key) for key in keys}

    def reset_pools() -> None:
        # Drop the app's references only: kombu keeps one pool per broker in a process-wide registry, and the
        # shared broker's pool must still be open when it is looked up again afterwards.
        app._after_fork()

    os.environ["CELERY_BROKER_URL"] = broker_url
    app.conf["CELERY_BROKER_URL"] = broker_url
    if broker_url.startswith("amqp"):
        app.conf["CELERY_BROKER_TRANSPORT_OPTIONS"] = {}
    if routes is not None:
        app.conf["CELERY_TASK_ROUTES"] = routes
    _refresh_router()
    reset_pools()
    try:
        yield
    finally:
        reset_pools()
        for key, value in saved.items():
            app.conf[key] = value
        _refresh_router()
        if saved_env is None:
            os.environ.pop("CELERY_BROKER_URL", None)
        else:
            os.environ["CELERY_BROKER_URL"] = saved_env
