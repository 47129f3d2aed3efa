#!/usr/bin/env python3
"""How fast health checks react: a target dies under load, then comes back.

Starts two real origins and a Ringgate gateway (2 workers) whose upstream has active checks
every 1 s and passive thresholds of 3 (Kong's fields), drives a steady stream of requests from
a few client threads (fresh connections, so every worker serves some), then:

  1. stops origin B (its port refuses connections) and measures, from the gateway's log (every
     failed connect and every health transition is logged with a millisecond timestamp), the
     time from its death until it was marked down (passively ejected or actively UNHEALTHY),
     the time until the last proxied request that still tried it, and how many proxied
     requests tried it after it was marked down (0 is the goal; retries hide them from clients);
  2. starts origin B again on the same port and measures the time from the moment it is about
     to listen again until its first proxied request.

Everything runs on loopback, is bounded in time, and stops the processes it started, by PID.

    python3 loadtest/health_timing.py [--rate 200] [--rounds 3]
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from ringgate.origin import OriginServer  # noqa: E402

LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(a: str, b: str) -> dict[str, object]:
    checks = {
        "active": {"type": "http", "http_path": "/status/200", "timeout": 1,
                   "healthy": {"interval": 1, "successes": 1},
                   "unhealthy": {"interval": 1, "tcp_failures": 3, "http_failures": 3, "timeouts": 3}},
        "passive": {"unhealthy": {"tcp_failures": 3, "http_failures": 3, "timeouts": 3}},
    }
    return {"_format_version": "3.0",
            "upstreams": [{"name": "pool", "healthchecks": checks, "targets": [{"target": a}, {"target": b}]}],
            "services": [{"name": "svc", "host": "pool", "routes": [{"name": "all", "paths": ["/"]}]}]}


class Load:
    """Client threads sending GET / at a bounded total rate until stopped; counts non-2xx answers."""

    def __init__(self, port: int, rate: float, threads: int = 4) -> None:
        self.port = port
        self.interval = threads / rate
        self.stop_event = threading.Event()
        self.errors = 0
        self.sent = 0
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        while not self.stop_event.is_set():
            started = time.monotonic()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/")
                status = conn.getresponse().status
                conn.close()
                if status >= 300:
                    self.errors += 1
            except OSError:
                self.errors += 1
            self.sent += 1
            self.stop_event.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(10)


def _log_times(lines: list[str], needle: str) -> list[float]:
    stamps = []
    for line in lines:
        if needle in line:
            match = LOG_TIME.match(line)
            if match:
                moment = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
                stamps.append(moment.timestamp())
    return stamps


@dataclass(frozen=True)
class RoundResult:
    marked_down_s: float | None  # death -> first "ejected" / "UNHEALTHY" line for the target
    last_attempt_s: float        # death -> last proxied connect attempt to it
    attempts_after_down: int     # proxied connect attempts to it after it was marked down
    recovered_s: float           # listening again -> first proxied request
    errors: int
    sent: int


def one_round(rate: float, workdir: Path) -> RoundResult:
    a = OriginServer("a").start()
    b_port = _free_port()
    b = OriginServer("b", port=b_port).start()
    proxy_port, admin_port = _free_port(), _free_port()
    conf = workdir / "kong.yml"
    conf.write_text(yaml.safe_dump(_config(a.address, b.address)))
    lines: list[str] = []
    proc = subprocess.Popen(
        [sys.executable, "-m", "ringgate", "start", "-c", str(conf), "--workers", "2",
         "--proxy-listen", f"127.0.0.1:{proxy_port}", "--admin-listen", f"127.0.0.1:{admin_port}",
         "--prefix", str(workdir / "prefix")],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    def read_output() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 20
        while not any("ringgate: ready" in line for line in lines):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("gateway did not start:\n" + "\n".join(lines))
            time.sleep(0.05)
        with Load(proxy_port, rate) as load:
            time.sleep(2.0)
            died_at = time.time()
            b.stop()
            time.sleep(4.0)
            attempts = _log_times(lines, f"connect to {b.address} failed")
            down_marks = _log_times([line for line in lines if b.address in line],
                                    " ejected ") + _log_times(lines, f"{b.address} is now UNHEALTHY")
            down_at = min(down_marks) if down_marks else None
            last_attempt = max(attempts) if attempts else died_at
            b = OriginServer("b", port=b_port)
            back_at = time.time()  # taken before it listens: a request cannot arrive earlier
            b.start()
            first_request = None
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                if any(path == "/" for _, path in list(b.log)):  # proxied traffic, not a probe
                    first_request = time.time()
                    break
                time.sleep(0.005)
            errors = load.errors
            sent = load.sent
        if first_request is None:
            raise RuntimeError("the recovered target never got traffic back")
        # Log stamps have millisecond resolution: an attempt in the same millisecond as the mark
        # counts as before it.
        late = sum(1 for stamp in attempts if down_at is not None and stamp > down_at + 0.001)
        return RoundResult(None if down_at is None else down_at - died_at, last_attempt - died_at, late,
                           first_request - back_at, errors, sent)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        a.stop()
        b.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second (default 200)")
    parser.add_argument("--rounds", type=int, default=3, help="repetitions (default 3)")
    args = parser.parse_args()
    results: list[RoundResult] = []
    for number in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="ringgate-health-") as tmp:
            results.append(one_round(args.rate, Path(tmp)))
        r = results[-1]
        print(f"round {number + 1}: death -> marked down {_ms(r.marked_down_s)}, death -> last request to it "
              f"{_ms(r.last_attempt_s)} ({r.attempts_after_down} after it was marked down), recovery -> first "
              f"request {_ms(r.recovered_s)}, client errors {r.errors}/{r.sent}", flush=True)
    downs = [r.marked_down_s for r in results if r.marked_down_s is not None]
    lasts = [r.last_attempt_s for r in results]
    backs = [r.recovered_s for r in results]
    print()
    print(f"| measure ({args.rounds} rounds, {args.rate:.0f} req/s, 2 workers) | median | max |")
    print("|---|---|---|")
    if downs:
        never = len(results) - len(downs)
        print(f"| target death -> marked down (ejected or UNHEALTHY){f' ({never} rounds: never)' if never else ''} "
              f"| {_ms(statistics.median(downs))} | {_ms(max(downs))} |")
    else:
        print("| target death -> marked down (ejected or UNHEALTHY) | never | never |")
    print(f"| target death -> last proxied request that tried it | {_ms(statistics.median(lasts))} | {_ms(max(lasts))} |")
    print(f"| proxied requests that tried it after it was marked down | "
          f"{statistics.median(r.attempts_after_down for r in results):g} per round | "
          f"{max(r.attempts_after_down for r in results)} |")
    print(f"| target listening again -> first proxied request | {_ms(statistics.median(backs))} | {_ms(max(backs))} |")
    print(f"| client-visible errors | {sum(r.errors for r in results)} of {sum(r.sent for r in results)} | |")
    return 0


def _ms(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds * 1000:.0f} ms"


if __name__ == "__main__":
    raise SystemExit(main())
