"""`ringgate stats`: ask the running node's stats socket and print readable tables (or JSON)."""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import orjson

from ringgate.stats import OVERFLOW_NAME
from ringgate.statsock import STATS_SOCKET, StatsSocketError, query

QUERY_TIMEOUT_S = 5.0


def run(prefix: str, as_json: bool, out: TextIO, err: TextIO | None = None) -> int:
    """Print the stats of the node running with --prefix `prefix`; 0 on success, 1 otherwise."""
    err = err if err is not None else sys.stderr
    path = os.path.join(prefix, STATS_SOCKET)
    try:
        reply = query(path, {"op": "stats"}, QUERY_TIMEOUT_S)
    except (FileNotFoundError, ConnectionRefusedError):
        err.write(f"ringgate stats: no stats socket answering at {path}: "
                  f"is the gateway running with --prefix {prefix}?\n")
        return 1
    except (TimeoutError, StatsSocketError, OSError) as exc:
        err.write(f"ringgate stats: {path}: {exc}\n")
        return 1
    if "error" in reply or not isinstance(reply.get("stats"), dict):
        err.write(f"ringgate stats: the gateway answered: {reply.get('error', 'no stats in the reply')}\n")
        return 1
    doc = reply["stats"]
    if as_json:
        out.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        out.write(render_tables(doc))
    return 0


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Columns padded to their widest cell; numbers right-aligned, text left-aligned."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    numeric = [all(_is_number(row[i]) for row in rows) and bool(rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        padded = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  " + "  ".join(padded).rstrip()

    return [line(headers)] + [line(row) for row in cells]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) or value is None


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def mean_ms(hist: dict[str, Any]) -> float | None:
    return hist["sum"] / hist["count"] if hist["count"] else None


def quantile_bound(hist: dict[str, Any], q: float) -> str:
    """The upper bound of the bucket holding the q-quantile: "<=250" (ms), "-" without data."""
    if not hist["count"]:
        return "-"
    wanted = q * hist["count"]
    for le, cumulative in hist["buckets"]:
        if cumulative >= wanted:
            return f"<={le}" if le != "+Inf" else f">{hist['buckets'][-2][0]}"
    return "-"


def _status_row(counters: dict[str, Any]) -> list[Any]:
    status = counters["status"]
    return [counters["requests"], status["1xx"], status["2xx"], status["3xx"], status["4xx"], status["5xx"]]


STATUS_HEADERS = ["requests", "1xx", "2xx", "3xx", "4xx", "5xx"]


def render_tables(doc: dict[str, Any]) -> str:
    node, config = doc["node"], doc["config"]
    config_hash = config["hash"] or "-"
    lines = [
        (f"ringgate {node['version']} node {node['node_id'] or '-'} on {node['hostname']}, "
         f"up {_duration(node['uptime_s'])}, config {config_hash[:12]} (generation {config['generation']})"),
        "",
        "Totals (live workers + retired)",
    ]
    totals = doc["totals"]
    lines += table(STATUS_HEADERS + ["conns active", "conns accepted", "bytes in", "bytes out", "retries",
                                     "connect errors", "timeouts"],
                   [_status_row(totals) + [totals["connections"]["active"], totals["connections"]["accepted"],
                                           totals["bytes"]["in"], totals["bytes"]["out"], totals["retries"],
                                           totals["upstream"]["connect_errors"], totals["upstream"]["timeouts"]]])
    lines += ["", "Workers"]
    rows = [[w["slot"], w["pid"]] + _status_row(w) + [w["connections"]["active"], w["heartbeat_age_ms"]]
            for w in doc["workers"]]
    rows.append(["retired", "-"] + _status_row(doc["retired"]) + [None, None])
    lines += table(["slot", "pid"] + STATUS_HEADERS + ["conns active", "heartbeat age ms"], rows)
    if doc["routes"]:
        lines += ["", "Routes (latency in ms)"]
        rows = []
        for r in doc["routes"]:
            latency = r["latency_ms"]
            top = sorted(r["codes"].items(), key=lambda item: -item[1])[:4]
            rows.append([r["service"], r["route"]] + [r["requests"]] + [r["status"][k] for k in
                                                                        ("2xx", "3xx", "4xx", "5xx")]
                        + [mean_ms(latency["request"]), quantile_bound(latency["request"], 0.5),
                           quantile_bound(latency["request"], 0.95),
                           mean_ms(latency["upstream"]), mean_ms(latency["kong"]),
                           " ".join(f"{code}:{count}" for code, count in top) or "-"])
        lines += table(["service", "route", "requests", "2xx", "3xx", "4xx", "5xx", "mean", "p50", "p95",
                        "upstream mean", "own mean", "codes"], rows)
    health = {(h.get("upstream"), h.get("target")): h.get("state", "-") for h in doc.get("health", [])}
    if doc["targets"] or health:
        lines += ["", "Targets (latency in ms)"]
        rows = []
        for t in doc["targets"]:
            failures = t["failures"]
            rows.append([t["upstream"], t["target"], health.pop((t["upstream"], t["target"]), "-"), t["requests"],
                         failures["connect"], failures["timeout"], failures["status"], t["latency_ms"]["mean"]])
        rows += [[upstream, target, state, 0, 0, 0, 0, None] for (upstream, target), state in sorted(health.items())]
        lines += table(["upstream", "target", "health", "requests", "connect fails", "timeouts", "status fails",
                        "mean"], rows)
    if doc.get("breakers"):
        lines += ["", "Breakers"]
        lines += table(["route", "state"], [[b.get("route", "-"), b.get("state", "-")] for b in doc["breakers"]])
    if doc.get("fallbacks"):
        lines += ["", "Fallbacks"]
        lines += table(["route", "trigger", "final status", "count", "mean ms"],
                       [[f.get("route", "-"), f.get("trigger", "-"), f.get("final_status", "-"), f.get("count", 0),
                         mean_ms(f["duration_ms"]) if f.get("duration_ms") else None] for f in doc["fallbacks"]])
    if doc["series"]["overflowed"]:
        lines += ["", (f"note: {doc['series']['overflowed']} series were refused for lack of room "
                       f"({doc['series']['per_slot']} per worker); they are counted under {OVERFLOW_NAME}")]
    for error in doc.get("errors", []):
        lines.append(f"warning: {error}")
    return "\n".join(lines) + "\n"

