#!/usr/bin/env python3
"""Side-by-side loopback benchmark: the origin directly, nginx as a reverse proxy, and Ringgate.

One run starts an nginx origin, an nginx proxy and a Ringgate gateway (1,000 prefix routes each),
measures every target with wrk at two body sizes, prints a markdown table with ratios to nginx,
saves JSON under loadtest/results/, and stops every process it started, by PID.

    python3 loadtest/bench.py [--duration 10] [--connections 50] [--workers 1] [--quick] [--tls]

--tls adds two targets: nginx and Ringgate terminating TLS (same certificate, made for the run) with
wrk over https and keep-alive, next to the plain ones in the same rounds and the same table.

--variants health,fallback,breaker-open,access-log adds Ringgate with one feature on (see
loadtest/variants.py), each its own row, right after plain Ringgate in every round, compared with
nginx and with plain Ringgate. A variant's gateway is started before its measurement and stopped
after it, so only one gateway works at a time.

CPU pinning (taskset): both proxies on CPU 0; the origin and wrk on CPU 1. See loadtest/README.md.
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import TypedDict

LOADTEST_DIR = Path(__file__).resolve().parent
REPO_ROOT = LOADTEST_DIR.parent
RESULTS_DIR = LOADTEST_DIR / "results"
sys.path.insert(0, str(LOADTEST_DIR))

import gen_config  # noqa: E402  (sibling modules; the path entry above makes them importable)
import variants  # noqa: E402

TARGETS: tuple[str, ...] = ("origin", "nginx", "ringgate")
# With --tls: the same proxies on a second, TLS port; each TLS row is compared with nginx's TLS row.
TLS_TARGETS: dict[str, str] = {"nginx-tls": "nginx", "ringgate-tls": "ringgate"}
TARGET_TITLES = {"origin": "origin (direct)", "nginx": "nginx proxy", "ringgate": "ringgate",
                 "nginx-tls": "nginx proxy, TLS", "ringgate-tls": "ringgate, TLS"}
TLS_SERVER_NAME = "bench.ringgate.test"
# Mozilla "intermediate" TLS 1.2 ciphers, the list Ringgate's listeners use (ringgate/tls.py).
TLS_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384", "DHE-RSA-CHACHA20-POLY1305",
))  # fmt: skip
VARIANT_PREFIX = "ringgate+"  # a variant's target name: "ringgate+health"
RINGGATE_READY_PREFIX = "ringgate: ready"
WRK_SOCKET_TIMEOUT = "5s"
STOP_GRACE_SECONDS = 15.0
ORIGIN_STATUS_PATH = "/nginx_status"
NOISY_CPU_BUSY = 0.10
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def title_of(target: str) -> str:
    if target.startswith(VARIANT_PREFIX):
        return variants.VARIANTS[target.removeprefix(VARIANT_PREFIX)].title
    return TARGET_TITLES[target]


def is_variant(target: str) -> bool:
    return target.startswith(VARIANT_PREFIX)


def _fixed_body(size: int, seed: str) -> bytes:
    """A deterministic printable body of exactly `size` bytes (safe inside an nginx string)."""
    pattern = (seed + "-abcdefghijklmnopqrstuvwxyz0123456789").encode()
    return (pattern * (size // len(pattern) + 1))[:size]


@dataclass(frozen=True)
class BodySize:
    label: str
    origin_path: str
    body: bytes


SIZES: tuple[BodySize, ...] = (
    BodySize("100 B", "/small", _fixed_body(100, "ringgate-bench-small")),
    BodySize("16 KiB", "/large", _fixed_body(16 * 1024, "ringgate-bench-large")),
)

# wrk calls done() once at the end; printing from it gives exact microsecond percentiles and the
# error counters, which the human-readable --latency block rounds or omits. No request()/response()
# hooks are defined, so wrk keeps its fast path.
WRK_REPORT_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"duration_us":%.0f,"requests":%.0f,"bytes":%.0f,'
    .. '"connect_errors":%.0f,"read_errors":%.0f,"write_errors":%.0f,"status_errors":%.0f,"timeouts":%.0f,'
    .. '"p50_us":%.0f,"p90_us":%.0f,"p99_us":%.0f,"p999_us":%.0f,"mean_us":%.1f,"max_us":%.0f}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.mean, latency.max))
end
"""


class BenchError(Exception):
    """A condition that stops the benchmark; its text is the message shown to the user."""


class Interrupted(BaseException):
    """Raised from a SIGTERM/SIGHUP handler so that cleanup runs as it does for Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# --- processes -------------------------------------------------------------------------------


def _proc_start_time(pid: int) -> int | None:
    """Kernel start time of a live (non-zombie) `pid`, field 22 of /proc/PID/stat; comparing it
    guards against signalling a recycled PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; the fields after it split safely.
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else int(fields[19])


def _parent_map() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parents[int(entry)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    return parents


def process_tree(root_pid: int) -> list[int]:
    """`root_pid` followed by all its live descendants."""
    children: dict[int, list[int]] = {}
    for pid, parent in _parent_map().items():
        children.setdefault(parent, []).append(pid)
    tree: list[int] = []
    pending = [root_pid]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children.get(pid, ()))
    return tree


@dataclass
class Server:
    """A process this script started, with every descendant it was seen to have."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    argv: list[str]
    # pid -> kernel start time, refreshed while running so stop() can reach orphaned workers.
    known_tree: dict[int, int] = field(default_factory=dict)

    def refresh_tree(self) -> None:
        if self.process.poll() is not None:
            return
        for pid in process_tree(self.process.pid):
            start = _proc_start_time(pid)
            if start is not None:
                self.known_tree[pid] = start

    def cpu_seconds(self) -> float:
        """User + system CPU time of the whole recorded tree so far (live processes; a thread that
        exited is still counted in its process's total)."""
        self.refresh_tree()
        ticks = 0
        for pid, start in self.known_tree.items():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[19]) == start:
                ticks += int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / CLOCK_TICKS

    def stop(self, stop_signal: int) -> list[str]:
        """Signal the root by PID, wait, then SIGKILL whatever of the recorded tree is left.
        Returns warnings for every process that had to be killed."""
        self.refresh_tree()
        warnings: list[str] = []
        if self.process.poll() is None:
            os.kill(self.process.pid, stop_signal)
            try:
                self.process.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                warnings.append(f"{self.name} (pid {self.process.pid}) ignored "
                                f"{signal.Signals(stop_signal).name} for {STOP_GRACE_SECONDS:g} s; killed")
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=STOP_GRACE_SECONDS)
        children = {pid: start for pid, start in self.known_tree.items() if pid != self.process.pid}
        # Give children a moment to follow their parent out before forcing them.
        deadline = time.monotonic() + 5.0
        while any(_proc_start_time(pid) == start for pid, start in children.items()) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid, start in children.items():
            if _proc_start_time(pid) != start:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            warnings.append(f"{self.name}: child pid {pid} outlived its parent; killed")
        return warnings


class Supervisor:
    """Starts servers in their own session (a terminal's Ctrl-C reaches only this script) and
    stops them in reverse order, always."""

    def __init__(self) -> None:
        self.servers: list[Server] = []
        self.warnings: list[str] = []

    def start(self, name: str, argv: list[str], port: int, log_path: Path, env: dict[str, str] | None = None) -> Server:
        log_file = log_path.open("wb")
        try:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                cwd=REPO_ROOT, env=env, start_new_session=True,
            )
        finally:
            log_file.close()
        server = Server(name=name, process=process, port=port, log_path=log_path, argv=argv)
        self.servers.append(server)
        return server

    def stop(self, server: Server) -> None:
        """Stop one server now (a variant's gateway after its measurement)."""
        self.servers.remove(server)
        # Ringgate stops gracefully on SIGTERM; nginx on SIGQUIT.
        stop_signal = signal.SIGTERM if server.name.startswith("ringgate") else signal.SIGQUIT
        try:
            self.warnings += server.stop(stop_signal)
        except (OSError, subprocess.TimeoutExpired) as error:
            self.warnings.append(f"could not stop {server.name} (pid {server.process.pid}): {error}")

    def stop_all(self) -> None:
        while self.servers:
            self.stop(self.servers[-1])


@contextmanager
def signals_blocked() -> Iterator[None]:
    """Cleanup must not be cut short by a second Ctrl-C."""
    blocked = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# --- readiness -------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all held open together so none repeats)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text.splitlines()[-lines:]) or "    (log is empty)"


def fetch(port: int, path: str, timeout: float = 3.0, tls: bool = False) -> tuple[int, bytes]:
    connection: http.client.HTTPConnection
    if tls:
        # The run's own self-signed certificate: checked by its bytes (check_tls_certificate), not a CA.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=context)
    else:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def wait_until_serving(server: Server, path: str, expected: bytes, timeout: float, ready_line: str | None) -> None:
    """Wait for the ready line (if any) and then for `path` to return exactly `expected`.
    Raises BenchError with the server's log tail if it exits, misanswers or runs out of time."""
    deadline = time.monotonic() + timeout
    last_problem = "no answer yet"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise BenchError(
                f"{server.name} exited with status {server.process.returncode} before serving.\n"
                f"command: {shlex.join(server.argv)}\nlog {server.log_path}:\n{log_tail(server.log_path)}"
            )
        if ready_line is not None:
            try:
                log_text = server.log_path.read_text(errors="replace")
            except OSError:
                log_text = ""
            if not any(line.startswith(ready_line) for line in log_text.splitlines()):
                last_problem = f"no line starting with {ready_line!r} on its stdout yet"
                time.sleep(0.1)
                continue
        try:
            status, body = fetch(server.port, path)
        except OSError as error:
            last_problem = f"GET {path}: {error}"
        else:
            if status == 200 and body == expected:
                server.refresh_tree()
                return
            last_problem = (
                f"GET {path} answered {status} with {len(body)} bytes, expected 200 with the benchmark's "
                f"{len(expected)}-byte body (a wrong route or upstream path would look like this)"
            )
        time.sleep(0.1)
    raise BenchError(
        f"{server.name} did not come up on 127.0.0.1:{server.port} within {timeout:.0f} s: {last_problem}.\n"
        f"command: {shlex.join(server.argv)}\nlog {server.log_path}:\n{log_tail(server.log_path)}"
    )


def check_tls_serving(name: str, port: int, path: str, expected: bytes, certificate_der: bytes) -> None:
    """A TLS target must answer `path` with exactly `expected`, presenting the run's certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        status, body = fetch(port, path, tls=True)
        with (socket.create_connection(("127.0.0.1", port), timeout=3) as raw,
              context.wrap_socket(raw, server_hostname=TLS_SERVER_NAME) as tls):
            presented = tls.getpeercert(binary_form=True)
    except OSError as error:
        raise BenchError(f"{name} on 127.0.0.1:{port} (TLS): GET {path}: {error}") from None
    if status != 200 or body != expected:
        raise BenchError(f"{name} on 127.0.0.1:{port} (TLS): GET {path} answered {status} with {len(body)} bytes")
    if presented != certificate_der:
        raise BenchError(f"{name} on 127.0.0.1:{port} (TLS) presents another certificate than the run's")


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed EC P-256 certificate for the run (what Ringgate generates for its default one)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TLS_SERVER_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(TLS_SERVER_NAME)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "bench.crt", directory / "bench.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.chmod(0o644)
    return cert_path, key_path


def nginx_with_tls(conf: str, port: int, tls_port: int, cert_path: Path, key_path: Path) -> str:
    """The proxy's config with a second, TLS listener in the same server block (same routes)."""
    listen = f"listen 127.0.0.1:{port};"
    if conf.count(listen) != 1:
        raise BenchError(f"the nginx proxy config has no single {listen!r} line to add a TLS listener next to")
    tls = "\n        ".join((
        listen,
        f"listen 127.0.0.1:{tls_port} ssl;",
        f"ssl_certificate {cert_path};",
        f"ssl_certificate_key {key_path};",
        "ssl_protocols TLSv1.2 TLSv1.3;",
        f"ssl_ciphers {TLS_CIPHERS};",
    ))
    return conf.replace(listen, tls)


def ringgate_config_with_tls(kong_yml: str, cert_path: Path, key_path: Path) -> str:
    """The kong.yml with the run's certificate for every server name (Kong's catch-all SNI "*")."""
    import yaml

    config = yaml.safe_load(kong_yml)
    config["certificates"] = [{"cert": cert_path.read_text(), "key": key_path.read_text(), "snis": [{"name": "*"}]}]
    return yaml.safe_dump(config, sort_keys=False)


def origin_counters(port: int) -> tuple[int, int]:
    """(accepted connections, requests) from the origin's stub_status page; each read opens one
    connection and makes one request of its own."""
    status, body = fetch(port, ORIGIN_STATUS_PATH)
    lines = body.decode().splitlines()
    if status != 200 or len(lines) < 3:
        raise BenchError(f"unexpected answer from the origin's {ORIGIN_STATUS_PATH}: {status} {body!r}")
    accepts, _handled, requests = (int(value) for value in lines[2].split())
    return accepts, requests


# --- wrk -------------------------------------------------------------------------------------


@dataclass
class WrkResult:
    url: str
    command: str
    duration_s: float
    requests: int
    requests_per_sec: float
    bytes_read: int
    p50_us: float
    p90_us: float
    p99_us: float
    p999_us: float
    mean_us: float
    max_us: float
    connect_errors: int
    read_errors: int
    write_errors: int
    timeouts: int
    non_2xx_3xx: int
    raw_output: str

    @property
    def errors(self) -> int:
        return self.connect_errors + self.read_errors + self.write_errors + self.timeouts + self.non_2xx_3xx


def parse_wrk_output(output: str, url: str, command: str) -> WrkResult:
    json_lines = [line for line in output.splitlines() if line.startswith("WRK_JSON ")]
    if len(json_lines) != 1:
        raise BenchError(f"could not find wrk's summary line in its output:\n{output}")
    data = json.loads(json_lines[0].removeprefix("WRK_JSON "))
    duration_s = data["duration_us"] / 1e6
    if duration_s <= 0 or data["requests"] <= 0:
        raise BenchError(f"wrk completed no requests against {url}:\n{output}")
    return WrkResult(
        url=url, command=command, duration_s=duration_s, requests=int(data["requests"]),
        requests_per_sec=data["requests"] / duration_s, bytes_read=int(data["bytes"]),
        p50_us=data["p50_us"], p90_us=data["p90_us"], p99_us=data["p99_us"], p999_us=data["p999_us"],
        mean_us=data["mean_us"], max_us=data["max_us"],
        connect_errors=int(data["connect_errors"]), read_errors=int(data["read_errors"]),
        write_errors=int(data["write_errors"]), timeouts=int(data["timeouts"]),
        non_2xx_3xx=int(data["status_errors"]), raw_output=output,
    )


def run_wrk(
    url: str, seconds: float, connections: int, cpus: str, script: Path,
    probe: Callable[[], None] | None = None, probe_after: float = 0.0,
) -> WrkResult:
    """Run wrk pinned to `cpus`; if given, call `probe` once, `probe_after` seconds into the run."""
    threads = min(connections, len(parse_cpu_list(cpus)))
    argv = [
        "taskset", "-c", cpus, "wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s",
        "--timeout", WRK_SOCKET_TIMEOUT, "--latency", "-s", str(script), url,
    ]
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        if probe is not None:
            try:
                process.communicate(timeout=probe_after)
            except subprocess.TimeoutExpired:
                probe()  # the usual case: wrk is still running
        output, _ = process.communicate(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish within {seconds + 30:g} s against {url}") from None
    finally:
        # On a timeout or Ctrl-C, kill wrk by PID and reap it before going on.
        if process.poll() is None:
            process.kill()
            process.wait()
    if process.returncode != 0:
        raise BenchError(f"wrk failed (exit {process.returncode}) against {url}:\n{output}")
    return parse_wrk_output(output, url, shlex.join(argv))


# --- machine, memory, formatting -------------------------------------------------------------


def parse_cpu_list(text: str) -> set[int]:
    """Parse a taskset-style list such as "0", "1,3" or "0-2"."""
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise argparse.ArgumentTypeError(f"not a CPU list: {text!r}")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def cpu_jiffies(cpus: set[int]) -> tuple[int, int]:
    """(busy, total) jiffies summed over `cpus` from /proc/stat; idle and iowait count as not busy."""
    busy = total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        # user nice system idle iowait irq softirq steal (guest time is already inside user)
        counters = [int(value) for value in values[:8]]
        total += sum(counters)
        busy += sum(counters) - counters[3] - counters[4]
    return busy, total


def busy_fraction(before: tuple[int, int], after: tuple[int, int]) -> float:
    elapsed = after[1] - before[1]
    return (after[0] - before[0]) / elapsed if elapsed > 0 else 0.0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def tool_version(argv: list[str]) -> str:
    try:
        completed = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = (completed.stdout + completed.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def machine_info() -> dict[str, object]:
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": sorted(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": tool_version(["nginx", "-v"]).removeprefix("nginx version: "),
        "wrk": "wrk " + tool_version(["wrk", "-v"]).removeprefix("wrk ").split(" Copyright")[0],
        "git_revision": tool_version(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"]),
    }


@dataclass(frozen=True)
class ProcessMemory:
    pid: int
    command: str
    rss_kib: int
    pss_kib: int


class TreeMemory(TypedDict):
    processes: list[dict[str, object]]
    process_count: int
    rss_kib_total: int
    pss_kib_total: int


def memory_of_tree(root_pid: int) -> TreeMemory:
    """RSS and PSS of a process and its descendants. RSS summed over processes counts shared
    pages (forked workers, shared memory) once per process; PSS splits them, so it sums honestly."""
    processes: list[ProcessMemory] = []
    for pid in process_tree(root_pid):
        fields: dict[str, int] = {}
        try:
            for name, path in (("VmRSS", f"/proc/{pid}/status"), ("Pss", f"/proc/{pid}/smaps_rollup")):
                for line in Path(path).read_text().splitlines():
                    if line.startswith(name + ":"):
                        fields[name] = int(line.split()[1])
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        processes.append(ProcessMemory(pid, command[:120], fields.get("VmRSS", 0), fields.get("Pss", 0)))
    return {
        "processes": [asdict(process) for process in processes],
        "process_count": len(processes),
        "rss_kib_total": sum(process.rss_kib for process in processes),
        "pss_kib_total": sum(process.pss_kib for process in processes),
    }


def format_ms(microseconds: float) -> str:
    return f"{microseconds / 1000:.3f} ms"


def format_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


@dataclass
class CaseResult:
    target: str
    size: str
    result: WrkResult
    # Share of the measured run during which those CPUs were busy (any process).
    proxy_cpu_busy: float
    load_cpu_busy: float
    # Connections the origin accepted once the run had settled: 0 when a proxy keeps reusing its
    # upstream keep-alive pool (the first second is left out, where a proxy may replace upstream
    # connections it dropped when the warm-up's clients went away mid-response).
    origin_connections_opened: int
    rps_ratio_to_nginx: float | None = None
    p99_ratio_to_nginx: float | None = None
    # CPU time the proxy's process tree used during the measured run, per completed request: unlike
    # req/s, it hardly moves when other work on a shared machine takes turns on the proxy's CPU.
    proxy_cpu_us_per_request: float | None = None
    # Plain Ringgate and its variants: req/s over plain Ringgate's median row at the same size.
    rps_ratio_to_ringgate: float | None = None


def median_case(runs: list[CaseResult]) -> CaseResult:
    """The round with the median req/s (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda case: case.result.requests_per_sec)
    return ordered[(len(ordered) - 1) // 2]


def baseline_of(target: str) -> str:
    """The nginx row a target is compared with: nginx's TLS row for TLS targets."""
    return "nginx-tls" if target in TLS_TARGETS else "nginx"


def add_ratios(cases: list[CaseResult]) -> None:
    baseline = {(case.size, case.target): case.result
                for case in cases if case.target in ("nginx", "nginx-tls", "ringgate")}
    for case in cases:
        ringgate = baseline.get((case.size, "ringgate"))
        if ringgate is not None and (case.target == "ringgate" or is_variant(case.target)):
            case.rps_ratio_to_ringgate = case.result.requests_per_sec / ringgate.requests_per_sec
        nginx = baseline.get((case.size, baseline_of(case.target)))
        if nginx is None:
            continue
        case.rps_ratio_to_nginx = case.result.requests_per_sec / nginx.requests_per_sec
        case.p99_ratio_to_nginx = case.result.p99_us / nginx.p99_us if nginx.p99_us > 0 else None


def background_line(busy: dict[str, float], settings: dict[str, object]) -> str:
    line = (f"- background load in the second before the servers started: CPU {settings['proxy_cpus']} "
            f"{busy['proxy']:.0%} busy, CPU {settings['load_cpus']} {busy['load']:.0%} busy")
    if max(busy.values()) > NOISY_CPU_BUSY:
        line += " (**not idle: other work shares these CPUs, so the numbers are noisy**)"
    return line


TLS_NOTE = ("- TLS rows: wrk over https with keep-alive (one handshake per connection), both proxies on a second "
            "port with the same self-signed EC P-256 certificate, TLS 1.2/1.3, the same cipher list; "
            "compared with nginx's TLS row")


VARIANTS_NOTE = ("- variants: each is its own gateway, started before its measurement and stopped after it, "
                 "pinned like plain ringgate; measured right after plain ringgate in every round")


def cost_verdict(variant: variants.Variant, median_ratio: float) -> str:
    cost = 1.0 - median_ratio
    text = f"{cost:+.1%}" if cost < 0 else f"{cost:.1%}"
    if variant.max_cost is None:
        return text
    verdict = "met" if cost <= variant.max_cost else "**missed**"
    return f"{text} (issue {variant.issue}: at most {variant.max_cost:.0%}, {verdict})"


def _median_over(values: list[float], control: list[float]) -> str:
    """Median of the round-by-round quotients values[i] / control[i]."""
    quotients = [value / base for value, base in zip(values, control) if base > 0]
    return f"{statistics.median(quotients):.2f}" if quotients else "n/a"


def variant_report(meta: dict[str, object]) -> list[str]:
    """Each variant over plain ringgate, per round (the two were measured back to back), and the
    median of those per-round ratios, which the budget of the variant's issue is checked against.
    Two measures: req/s, and plain ringgate's CPU per request over the variant's (the req/s ratio a
    CPU-bound proxy would show, much steadier when other work shares the machine)."""
    ratios, cpu_ratios = meta["variant_ratios_to_ringgate"], meta["variant_cpu_ratios_to_ringgate"]
    assert isinstance(ratios, dict) and isinstance(cpu_ratios, dict)
    with_control = "control" in ratios
    lines = [
        ("Variants over plain ringgate, per round (measured back to back), and the median round; "
         "cost = 1 - median ratio"
         + ("; the last two columns divide each round's ratio by the restarted control's in that round "
            "(both are fresh processes):" if with_control else ":")),
        "",
        ("| variant | size | req/s ratio per round | median | cost by req/s "
         "| CPU-per-request ratio per round | median | cost by CPU per request |"
         + (" req/s over control, median | CPU over control, median |" if with_control else "")),
        "|---|---|---|---:|---|---|---:|---|" + ("---:|---:|" if with_control else ""),
    ]
    for name, by_size in ratios.items():
        variant = variants.VARIANTS[name]
        for size, per_round in by_size.items():
            if not per_round:
                continue
            median = statistics.median(per_round)
            cpu_round = cpu_ratios.get(name, {}).get(size, [])
            cpu_cells = "n/a | n/a | n/a"
            if cpu_round:
                cpu_median = statistics.median(cpu_round)
                cpu_cells = (f"{', '.join(f'{r:.2f}' for r in cpu_round)} | {cpu_median:.2f} | "
                             f"{cost_verdict(variant, cpu_median)}")
            control_cells = ""
            if with_control:
                control_cells = (f" {_median_over(per_round, ratios['control'].get(size, []))} |"
                                 f" {_median_over(cpu_round, cpu_ratios['control'].get(size, []))} |")
            lines.append(f"| {variant.title} | {size} | {', '.join(f'{r:.2f}' for r in per_round)} | "
                         f"{median:.2f} | {cost_verdict(variant, median)} | {cpu_cells} |{control_cells}")
    lines += ["", "What each variant is:", ""]
    lines += [f"- {variants.VARIANTS[name].title}: {variants.VARIANTS[name].summary}" for name in ratios]
    return lines


def markdown_report(
    cases: list[CaseResult], meta: dict[str, object], memory: dict[str, TreeMemory]
) -> str:
    machine, settings, background_busy = meta["machine"], meta["settings"], meta["background_cpu_busy"]
    round_ratios = meta["round_ratios"]
    rebuilt = meta.get("extensions_rebuilt_during_run") or []
    assert isinstance(rebuilt, list)
    assert isinstance(machine, dict) and isinstance(settings, dict) and isinstance(background_busy, dict)
    assert isinstance(round_ratios, dict)
    lines = [
        "## Ringgate vs nginx: loopback benchmark",
        "",
        f"- date: {meta['date']}",
        f"- machine: nproc {machine['nproc']}, {machine['cpu_model']}, Linux {machine['kernel']}, "
        f"Python {machine['python']}, {machine['nginx']}, {machine['wrk']}",
        f"- command: `{meta['command']}`",
        f"- pinning: proxies on CPU {settings['proxy_cpus']}, origin and wrk on CPU {settings['load_cpus']}; "
        f"wrk {settings['connections']} connections, {settings['duration_s']:g} s per case after a "
        f"{settings['warmup_s']:g} s warm-up; ringgate --workers {settings['ringgate_workers']}, nginx 1 worker",
        f"- routes: {settings['routes']} prefix routes on both proxies; the benchmarked one is "
        f"#{settings['target_route_index']} `{settings['target_route']}`, after shorter decoy prefixes",
        background_line(background_busy, settings),
        *([f"- **compiled extensions changed on disk during the run** ({', '.join(rebuilt)}): gateways started "
           "after that (variants) may run other code than plain ringgate; repeat the run"] if rebuilt else []),
        f"- rounds: {settings['rounds']}, targets interleaved; each row is that target's median round"
        + ("; ringgate/nginx req/s per round: " if any(round_ratios.values()) else "")
        + "; ".join(f"{size} " + ", ".join(f"{ratio:.2f}" for ratio in ratios)
                    for size, ratios in round_ratios.items() if ratios),
        *([TLS_NOTE] if settings.get("tls") else []),
        *([VARIANTS_NOTE] if settings.get("variants") else []),
        "",
    ]
    with_variants = bool(settings.get("variants"))
    ringgate_column = (("req/s ratio to ringgate | proxy CPU per request | ", "---:|---:|") if with_variants
                       else ("", ""))
    lines += [
        "| target | size | req/s | p50 | p99 | req/s ratio to nginx | p99 ratio to nginx | " + ringgate_column[0]
        + "errors | CPU busy (proxy / load) | origin conns opened |",
        "|---|---|---:|---:|---:|---:|---:|" + ringgate_column[1] + "---:|---:|---:|",
    ]
    for case in cases:
        r = case.result
        ringgate_ratio = ""
        if with_variants:
            cpu = case.proxy_cpu_us_per_request
            ringgate_ratio = (f"{format_ratio(case.rps_ratio_to_ringgate)} | "
                              f"{'n/a' if cpu is None else f'{cpu:.1f} µs'} | ")
        lines.append(
            f"| {title_of(case.target)} | {case.size} | {r.requests_per_sec:,.0f} | {format_ms(r.p50_us)} | "
            f"{format_ms(r.p99_us)} | {format_ratio(case.rps_ratio_to_nginx)} | "
            f"{format_ratio(case.p99_ratio_to_nginx)} | {ringgate_ratio}{r.errors} | "
            f"{case.proxy_cpu_busy:.0%} / {case.load_cpu_busy:.0%} | {case.origin_connections_opened} |"
        )
    if with_variants:
        lines += ["", *variant_report(meta)]
    if memory:
        lines += ["", "Memory of each proxy after the run (whole process tree"
                  + ("; a variant's after its last measurement):" if with_variants else "):"), "",
                  "| proxy | processes | RSS | PSS |", "|---|---:|---:|---:|"]
        for name, info in memory.items():
            rss_mib, pss_mib = info["rss_kib_total"] / 1024, info["pss_kib_total"] / 1024
            lines.append(f"| {title_of(name)} | {info['process_count']} | {rss_mib:.1f} MiB | {pss_mib:.1f} MiB |")
    return "\n".join(lines)


# --- the run ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured case (default 5)")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    parser.add_argument("--workers", type=int, default=1, help="ringgate proxy workers (default 1)")
    parser.add_argument("--quick", action="store_true", help="smoke check: 3 s per case, 1 s warm-up")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds before each case (default 1)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds per size; the table shows each target's median (default 3)")
    parser.add_argument("--routes", type=int, default=1000, help="routes on each proxy (default 1000)")
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help=f"comma-separated subset of {','.join(TARGETS)} (default: all)")
    parser.add_argument("--proxy-cpus", default="0", help="taskset CPU list for both proxies (default 0)")
    parser.add_argument("--load-cpus", default="1", help="taskset CPU list for the origin and wrk (default 1)")
    parser.add_argument("--startup-timeout", type=float, default=60.0, help="seconds for a server to come up")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs) after success")
    parser.add_argument("--tls", action="store_true",
                        help="also measure nginx and ringgate terminating TLS (https, keep-alive), same certificate")
    parser.add_argument("--variants", default="",
                        help="comma-separated Ringgate variants measured next to plain ringgate, from "
                             f"{','.join(variants.VARIANTS)} (default: none; see loadtest/variants.py)")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 3.0, 1.0
    args.target_list = [name.strip() for name in args.targets.split(",") if name.strip()]
    unknown = set(args.target_list) - set(TARGETS)
    if unknown or not args.target_list:
        parser.error(f"--targets takes names from {', '.join(TARGETS)}")
    if args.tls:
        args.target_list += [tls for tls, plain in TLS_TARGETS.items() if plain in args.target_list]
    try:
        args.variant_list = variants.parse_variant_list(args.variants)
    except ValueError as error:
        parser.error(str(error))
    if args.variant_list and "ringgate" not in args.target_list:
        parser.error("--variants are compared with plain ringgate: keep ringgate in --targets")
    if args.duration <= 0 or args.warmup < 0 or args.connections < 1 or args.workers < 1 or args.rounds < 1:
        parser.error("--duration and --connections and --workers must be positive, --warmup non-negative")
    for option in ("proxy_cpus", "load_cpus"):
        try:
            parse_cpu_list(getattr(args, option))
        except argparse.ArgumentTypeError as error:
            parser.error(str(error))
    return args


def check_prerequisites(args: argparse.Namespace) -> None:
    for tool in ("nginx", "wrk", "taskset"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not on PATH; the benchmark needs nginx, wrk and taskset")
    usable = os.sched_getaffinity(0)
    wanted = parse_cpu_list(args.proxy_cpus) | parse_cpu_list(args.load_cpus)
    if not wanted <= usable:
        raise BenchError(
            f"CPUs {sorted(wanted - usable)} are not available (usable: {sorted(usable)}); "
            "choose others with --proxy-cpus and --load-cpus"
        )
    if parse_cpu_list(args.proxy_cpus) & parse_cpu_list(args.load_cpus):
        print("bench: warning: proxy and load CPUs overlap; the numbers will mix proxy and client cost",
              file=sys.stderr)


def start_nginx(supervisor: Supervisor, name: str, prefix: Path, conf_text: str, port: int, cpus: str) -> Server:
    for sub in ("logs", "tmp"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(conf_text)
    argv = ["taskset", "-c", cpus, "nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "logs/error.log")]
    return supervisor.start(name, argv, port, prefix / "logs/stdout.log")


def extension_stamps() -> dict[str, float]:
    """Modification times of the repository's compiled extensions. Plain ringgate loads them once,
    at the start; a variant started later loads whatever is on disk then, so a rebuild during the
    run (another session's build, say) would compare different code."""
    return {str(path.relative_to(REPO_ROOT)): path.stat().st_mtime
            for directory in ("fastpath", "shared_state", "workers") for path in (REPO_ROOT / directory).glob("*.so")}


def start_ringgate(
    supervisor: Supervisor, name: str, directory: Path, kong_yml: Path, listen: str, port: int, admin_port: int,
    args: argparse.Namespace, extra_args: Sequence[str] = (),
) -> Server:
    argv = [
        "taskset", "-c", args.proxy_cpus, sys.executable, "-m", "ringgate", "start", "-c", str(kong_yml),
        "--proxy-listen", listen, "--admin-listen", f"127.0.0.1:{admin_port}",
        "--workers", str(args.workers), "--prefix", str(directory / "prefix"), *extra_args,
    ]
    # Unbuffered, so the ready line reaches the log file as soon as it is printed.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return supervisor.start(name, argv, port, directory / "stdout.log", env)


@dataclass
class VariantContext:
    """What every start of a variant's gateway needs."""

    base_config: dict[str, object]
    origin_ports: variants.OriginPorts
    route_name: str
    request_paths: list[tuple[str, bytes]]  # (path through the proxy, expected body) for every size
    work_dir: Path
    starts: int = 0


@dataclass
class VariantRun:
    variant: variants.Variant
    server: Server
    admin_port: int
    directory: Path


def start_variant(
    supervisor: Supervisor, variant: variants.Variant, context: VariantContext, args: argparse.Namespace
) -> VariantRun:
    """Start the variant's own gateway (fresh ports and prefix) and check that its feature is on."""
    import yaml

    context.starts += 1
    directory = context.work_dir / "variants" / f"{variant.name}-{context.starts}"
    directory.mkdir(parents=True)
    config = variants.variant_config(context.base_config, variant, context.origin_ports, context.route_name)
    kong_yml = directory / "kong.yml"
    kong_yml.write_text(yaml.safe_dump(config, sort_keys=False))
    proxy_port, admin_port = free_ports(2)
    server = start_ringgate(supervisor, VARIANT_PREFIX + variant.name, directory, kong_yml,
                            f"127.0.0.1:{proxy_port}", proxy_port, admin_port, args, variant.cli_args(directory))
    for path, body in context.request_paths:
        wait_until_serving(server, path, body, args.startup_timeout, RINGGATE_READY_PREFIX)
    problems: list[str] = []
    for path, body in context.request_paths:
        answer = variants.get(proxy_port, path)
        if answer.status != 200 or answer.body != body:
            problems.append(f"GET {path} answered {answer.status} with {len(answer.body)} bytes")
        problems += [f"GET {path}: {problem}" for problem in variant.check_answer(answer)]
    problems += variant.check_admin(admin_port)
    if problems:
        raise BenchError(
            f"variant {variant.name}: the pre-flight check failed: " + "; ".join(problems)
            + f"\ncommand: {shlex.join(server.argv)}\nlog {server.log_path}:\n{log_tail(server.log_path)}"
        )
    return VariantRun(variant, server, admin_port, directory)


def stop_variant(supervisor: Supervisor, run: VariantRun) -> dict[str, object]:
    """Stop the variant's gateway; returns facts worth keeping (the access log's line count)."""
    supervisor.stop(run.server)
    facts: dict[str, object] = {}
    log_path = variants.access_log_path(run.directory)
    if log_path.exists():
        with log_path.open("rb") as log_file:
            facts["access_log_lines"] = sum(chunk.count(b"\n") for chunk in iter(lambda: log_file.read(1 << 20), b""))
        facts["access_log_bytes"] = log_path.stat().st_size
        log_path.unlink()  # hundreds of MB over a long run; the count is what matters
    return facts


def run(args: argparse.Namespace, supervisor: Supervisor, work_dir: Path) -> dict[str, object]:
    targets: list[str] = args.target_list
    variant_names: list[str] = args.variant_list
    proxy_cpus, load_cpus = parse_cpu_list(args.proxy_cpus), parse_cpu_list(args.load_cpus)
    # Other work on these CPUs skews every number; measure it once so the report can say so.
    idle_before = cpu_jiffies(proxy_cpus), cpu_jiffies(load_cpus)
    time.sleep(1.0)
    background_busy = {"proxy": busy_fraction(idle_before[0], cpu_jiffies(proxy_cpus)),
                       "load": busy_fraction(idle_before[1], cpu_jiffies(load_cpus))}
    routes = gen_config.build_route_set(args.routes)
    (origin_port, nginx_port, ringgate_port, admin_port, nginx_tls_port, ringgate_tls_port,
     backup_port, failing_port) = free_ports(8)
    ports = {"origin": origin_port, "nginx": nginx_port, "ringgate": ringgate_port,
             "nginx-tls": nginx_tls_port, "ringgate-tls": ringgate_tls_port}
    proxied_prefix = routes.target_prefix.rstrip("/")
    tls = any(name in TLS_TARGETS for name in targets)
    if tls:
        tls_dir = work_dir / "tls"
        tls_dir.mkdir(mode=0o755)
        cert_path, key_path = make_certificate(tls_dir)
        certificate_der = ssl.PEM_cert_to_DER_cert(cert_path.read_text())

    def request_path(target: str, size: BodySize) -> str:
        # Through a proxy, the route prefix is stripped again before the request reaches the origin.
        return size.origin_path if target == "origin" else proxied_prefix + size.origin_path

    # The origin: workers run as an unprivileged user when nginx starts as root, so the body file
    # and the directories above it must be world-readable. Variants may need two more listeners.
    needs = set().union(*(variants.VARIANTS[name].needs for name in variant_names))
    work_dir.chmod(0o755)
    origin_dir = work_dir / "origin"
    origin_dir.mkdir(mode=0o755)
    large_file = origin_dir / "large.bin"
    large_file.write_bytes(SIZES[1].body)
    large_file.chmod(0o644)
    origin_conf = gen_config.nginx_origin_conf(
        origin_dir, origin_port, SIZES[0].body.decode(), large_file,
        backup_port=backup_port if "backup" in needs else None,
        failing_port=failing_port if "failing" in needs else None,
    )
    origin = start_nginx(supervisor, "origin", origin_dir, origin_conf, origin_port, args.load_cpus)
    for size in SIZES:
        wait_until_serving(origin, size.origin_path, size.body, args.startup_timeout, None)
    if "backup" in needs:
        backup = Server("origin backup listener", origin.process, backup_port, origin.log_path, origin.argv)
        for size in SIZES:
            wait_until_serving(backup, size.origin_path, size.body, args.startup_timeout, None)

    servers: dict[str, Server] = {"origin": origin}
    if "nginx" in targets:
        proxy_dir = work_dir / "nginx-proxy"
        proxy_dir.mkdir(mode=0o755)
        proxy_conf = gen_config.nginx_proxy_conf(proxy_dir, nginx_port, origin_port, routes)
        if "nginx-tls" in targets:
            proxy_conf = nginx_with_tls(proxy_conf, nginx_port, nginx_tls_port, cert_path, key_path)
        servers["nginx"] = start_nginx(supervisor, "nginx", proxy_dir, proxy_conf, nginx_port, args.proxy_cpus)
    if "ringgate" in targets:
        ringgate_dir = work_dir / "ringgate"
        ringgate_dir.mkdir()
        kong_yml = ringgate_dir / "kong.yml"
        kong_text = gen_config.kong_yml(origin_port, routes)
        listen = f"127.0.0.1:{ringgate_port}"
        if "ringgate-tls" in targets:
            kong_text = ringgate_config_with_tls(kong_text, cert_path, key_path)
            listen += f", 127.0.0.1:{ringgate_tls_port} ssl"
        kong_yml.write_text(kong_text)
        servers["ringgate"] = start_ringgate(supervisor, "ringgate", ringgate_dir, kong_yml, listen, ringgate_port,
                                             admin_port, args)
    for name in ("nginx", "ringgate"):
        if name in servers:
            ready_line = RINGGATE_READY_PREFIX if name == "ringgate" else None
            for size in SIZES:
                wait_until_serving(servers[name], request_path(name, size), size.body, args.startup_timeout, ready_line)
    for name, plain in TLS_TARGETS.items():
        if name in targets:
            servers[name] = servers[plain]  # the same process, measured on its TLS port
            for size in SIZES:
                check_tls_serving(name, ports[name], request_path(name, size), size.body, certificate_der)
    extensions_at_start = extension_stamps()
    variant_context = VariantContext(
        base_config=gen_config.kong_declarative_config(origin_port, routes),
        origin_ports=variants.OriginPorts(main=origin_port, backup=backup_port, failing=failing_port),
        route_name=gen_config.route_name(routes.target_index),
        request_paths=[(request_path("ringgate", size), size.body) for size in SIZES],
        work_dir=work_dir,
    )

    script = work_dir / "report.lua"
    script.write_text(WRK_REPORT_LUA)
    # Rounds interleave the targets (origin, nginx, ringgate, its variants, then the TLS rows) so that a
    # slow spell of this shared machine hits every target alike; the table shows each target's median round.
    order = [name for name in TARGETS if name in targets]
    order += [VARIANT_PREFIX + name for name in variant_names]
    order += [name for name in TLS_TARGETS if name in targets]
    measured: dict[tuple[str, str], list[CaseResult]] = {}
    memory: dict[str, TreeMemory] = {}
    variant_facts: dict[str, list[dict[str, object]]] = {}
    for size in SIZES:
        for round_index in range(args.rounds):
            for name in order:
                variant_run: VariantRun | None = None
                if is_variant(name):
                    variant = variants.VARIANTS[name.removeprefix(VARIANT_PREFIX)]
                    variant_run = start_variant(supervisor, variant, variant_context, args)
                    servers[name] = variant_run.server
                    url = f"http://127.0.0.1:{variant_run.server.port}{request_path('ringgate', size)}"
                else:
                    scheme = "https" if name in TLS_TARGETS else "http"
                    url = f"{scheme}://127.0.0.1:{ports[name]}{request_path(name, size)}"
                print(f"bench: round {round_index + 1}/{args.rounds}, {title_of(name)}, {size.label}: "
                      f"{args.warmup:g} s warm-up, {args.duration:g} s measured ({url})", file=sys.stderr, flush=True)
                if args.warmup > 0:
                    run_wrk(url, args.warmup, args.connections, args.load_cpus, script)
                settled_accepts: list[int] = []
                proxy_server = servers.get(name) if name != "origin" else None
                tree_cpu_before = proxy_server.cpu_seconds() if proxy_server is not None else 0.0
                proxy_before, load_before = cpu_jiffies(proxy_cpus), cpu_jiffies(load_cpus)
                result = run_wrk(url, args.duration, args.connections, args.load_cpus, script,
                                 probe=lambda: settled_accepts.append(origin_counters(origin_port)[0]),
                                 probe_after=min(1.0, args.duration / 4))
                if not settled_accepts:
                    raise BenchError(f"wrk ended before the probe, {min(1.0, args.duration / 4):g} s into the run")
                proxy_busy = busy_fraction(proxy_before, cpu_jiffies(proxy_cpus))
                load_busy = busy_fraction(load_before, cpu_jiffies(load_cpus))
                tree_cpu_used = proxy_server.cpu_seconds() - tree_cpu_before if proxy_server is not None else None
                accepts_after = origin_counters(origin_port)[0]
                servers[name].refresh_tree()
                measured.setdefault((size.label, name), []).append(CaseResult(
                    target=name, size=size.label, result=result, proxy_cpu_busy=proxy_busy,
                    load_cpu_busy=load_busy,
                    # The "after" status read is itself one accepted connection.
                    origin_connections_opened=accepts_after - settled_accepts[0] - 1,
                    proxy_cpu_us_per_request=None if tree_cpu_used is None else tree_cpu_used * 1e6 / result.requests,
                ))
                if variant_run is not None:
                    memory[name] = memory_of_tree(variant_run.server.process.pid)
                    facts = stop_variant(supervisor, variant_run)
                    variant_facts.setdefault(name, []).append(
                        {"size": size.label, "round": round_index + 1, "measured_requests": result.requests, **facts})
    cases = [median_case(runs) for runs in measured.values()]

    def per_round(target: str, baseline: str, label: str) -> list[float]:
        return [t.result.requests_per_sec / b.result.requests_per_sec
                for t, b in zip(measured.get((label, target), []), measured.get((label, baseline), []))]

    def cpu_per_round(target: str, label: str) -> list[float]:
        # Plain ringgate's CPU per request over the variant's: the req/s ratio a CPU-bound proxy would show.
        return [b.proxy_cpu_us_per_request / t.proxy_cpu_us_per_request
                for t, b in zip(measured.get((label, target), []), measured.get((label, "ringgate"), []))
                if t.proxy_cpu_us_per_request and b.proxy_cpu_us_per_request]

    round_ratios = {size.label: per_round("ringgate", "nginx", size.label) for size in SIZES}
    if tls:
        round_ratios.update({f"{size.label} TLS": per_round("ringgate-tls", "nginx-tls", size.label) for size in SIZES})
    variant_ratios = {
        name: {size.label: per_round(VARIANT_PREFIX + name, "ringgate", size.label) for size in SIZES}
        for name in variant_names
    }
    variant_cpu_ratios = {
        name: {size.label: cpu_per_round(VARIANT_PREFIX + name, size.label) for size in SIZES}
        for name in variant_names
    }
    add_ratios(cases)

    memory = {name: memory_of_tree(servers[name].process.pid) for name in ("nginx", "ringgate") if name in servers} | memory
    meta: dict[str, object] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(sys.orig_argv),
        "machine": machine_info(),
        "settings": {
            "duration_s": args.duration, "warmup_s": args.warmup, "connections": args.connections,
            "ringgate_workers": args.workers, "proxy_cpus": args.proxy_cpus, "load_cpus": args.load_cpus,
            "routes": len(routes.prefixes), "target_route_index": routes.target_index,
            "target_route": routes.target_prefix, "targets": targets, "rounds": args.rounds, "tls": tls,
            "variants": variant_names,
        },
        "round_ratios": round_ratios,
        "variant_ratios_to_ringgate": variant_ratios,
        "variant_cpu_ratios_to_ringgate": variant_cpu_ratios,
        "variant_facts": variant_facts,
        "background_cpu_busy": background_busy,
        "extensions_rebuilt_during_run": sorted(
            name for name, stamp in extension_stamps().items() if extensions_at_start.get(name) != stamp),
        "server_commands": {name: shlex.join(server.argv) for name, server in servers.items()},
    }
    report = markdown_report(cases, meta, memory)
    return {
        **meta,
        "results": [
            {"target": c.target, "size": c.size, "rps_ratio_to_nginx": c.rps_ratio_to_nginx,
             "p99_ratio_to_nginx": c.p99_ratio_to_nginx, "rps_ratio_to_ringgate": c.rps_ratio_to_ringgate,
             "proxy_cpu_busy": c.proxy_cpu_busy, "load_cpu_busy": c.load_cpu_busy,
             "proxy_cpu_us_per_request": c.proxy_cpu_us_per_request,
             "origin_connections_opened": c.origin_connections_opened, **asdict(c.result)}
            for c in cases
        ],
        "memory": memory,
        "markdown": report,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def interrupt(signum: int, _frame: FrameType | None) -> None:
        raise Interrupted(signum)

    # Installed explicitly: a shell that starts us in the background leaves SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)
    supervisor = Supervisor()
    work_dir = Path(tempfile.mkdtemp(prefix="ringgate-bench-"))
    succeeded = False
    try:
        check_prerequisites(args)
        report = run(args, supervisor, work_dir)
        succeeded = True
    except BenchError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Interrupted) as stop:
        signum = stop.signum if isinstance(stop, Interrupted) else signal.SIGINT
        print(f"bench: interrupted by {signal.Signals(signum).name}; stopping everything it started", file=sys.stderr)
        return 128 + signum
    finally:
        with signals_blocked():
            supervisor.stop_all()
            for warning in supervisor.warnings:
                print(f"bench: warning: {warning}", file=sys.stderr)
            if succeeded and not args.keep_tmp:
                shutil.rmtree(work_dir, ignore_errors=True)
            else:
                print(f"bench: configs and logs kept in {work_dir}", file=sys.stderr)

    report["stop_warnings"] = supervisor.warnings
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out_path = RESULTS_DIR / f"{stamp}.json"
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(report["markdown"])
    print(f"\nJSON: {out_path.relative_to(REPO_ROOT) if out_path.is_relative_to(REPO_ROOT) else out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
