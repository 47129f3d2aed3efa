"""The optional access log: one JSON line per request, to a file or stdout (off by default).

Each worker appends to the same file opened with O_APPEND and writes whole lines, so lines of
different workers never interleave. Lines are buffered and written every 0.1 s or at 64 KiB
(nginx's `access_log ... buffer=64k flush=100ms`): a worker killed with SIGKILL loses at most
that much; a graceful stop flushes.
"""
from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

import orjson

FLUSH_SECONDS = 0.1
FLUSH_BYTES = 64 * 1024


class AccessLog:
    def __init__(self, destination: str, loop: asyncio.AbstractEventLoop) -> None:
        if destination == "stdout":
            self.fd = sys.stdout.fileno()
            self.owned = False
        else:
            self.fd = os.open(destination, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self.owned = True
        self.loop = loop
        self.lines: list[bytes] = []
        self.size = 0
        self.timer: asyncio.TimerHandle | None = None

    def record(self, entry: dict[str, Any]) -> None:
        line = orjson.dumps(entry) + b"\n"
        self.lines.append(line)
        self.size += len(line)
        if self.size >= FLUSH_BYTES:
            self.flush()
        elif self.timer is None:
            self.timer = self.loop.call_later(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.lines:
            return
        data = b"".join(self.lines)
        self.lines = []
        self.size = 0
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]

    def close(self) -> None:
        self.flush()
        if self.owned:
            os.close(self.fd)


_second: list[object] = [-1, ""]  # the last whole second formatted, and its text


def iso_time(epoch: float) -> str:
    """UTC ISO 8601 with milliseconds; the seconds part is formatted once per second, not per line."""
    seconds = int(epoch)
    if seconds != _second[0]:
        _second[0] = seconds
        _second[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{_second[1]}.{int((epoch - seconds) * 1000):03d}Z"
