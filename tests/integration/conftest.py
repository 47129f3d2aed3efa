"""Integration fixtures: real origin servers on loopback and the real gateway started through its CLI."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pytest
import yaml

from ringgate.origin import OriginServer

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gateway:
    """A `ringgate start` process; stdout/stderr are collected for assertions and failure reports."""

    def __init__(self, config: dict[str, Any] | str | None, tmp: Path, workers: int = 1,
                 extra_args: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.proxy_port = free_port()
        self.admin_port = free_port()
        self.prefix = tmp / "prefix"
        args = [sys.executable, "-m", "ringgate", "start",
                "--proxy-listen", f"127.0.0.1:{self.proxy_port}",
                "--admin-listen", f"127.0.0.1:{self.admin_port}",
                "--workers", str(workers), "--prefix", str(self.prefix), "--drain-timeout", "5"]
        if config is not None:
            path = tmp / "kong.yml"
            path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
            args += ["-c", str(path)]
        self.args = args + (extra_args or [])
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.output: list[str] = []
        self._lines = threading.Condition()

    def start(self, expect_ready: bool = True, timeout: float = 20.0) -> "Gateway":
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._pump, daemon=True).start()
        if expect_ready:
            self.wait_for("ringgate: ready", timeout)
        return self

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lines:
                self.output.append(line.rstrip("\n"))
                self._lines.notify_all()

    def wait_for(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        with self._lines:
            while True:
                for line in self.output:
                    if text in line:
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc is not None and self.proc.poll() is not None
                                      and not any(text in line for line in self.output)):
                    raise AssertionError(f"gateway never printed {text!r}; output:\n" + "\n".join(self.output))
                self._lines.wait(min(remaining, 0.2))

    def log(self) -> str:
        return "\n".join(self.output)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def worker_pids(self) -> list[int]:
        assert self.proc is not None
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in self.worker_pids():
                    os.kill(pid, signal.SIGKILL)
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


@contextmanager
def serving(config: dict[str, Any], tmp: Path, origins: Iterable[Any], workers: int = 1) -> Iterator[Gateway]:
    """A gateway in front of already started origins; on exit the gateway stops, then the origins."""
    gateway = Gateway(config, tmp, workers=workers).start()
    try:
        yield gateway
    finally:
        gateway.stop()
        for origin in origins:
            origin.stop()


@pytest.fixture
def origin_factory() -> Iterator[Callable[[str], OriginServer]]:
    started: list[OriginServer] = []

    def make(name: str) -> OriginServer:
        server = OriginServer(name).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []
    counter = [0]

    def make(config: dict[str, Any] | str | None, workers: int = 1, start: bool = True, **kwargs: Any) -> Gateway:
        counter[0] += 1
        directory = tmp_path / f"gw{counter[0]}"
        directory.mkdir()
        gateway = Gateway(config, directory, workers=workers, **kwargs)
        started.append(gateway)
        if start:
            gateway.start()
        return gateway

    yield make
    for gateway in started:
        gateway.stop()
