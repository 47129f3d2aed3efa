"""Router.match cost against the number of routes (run: python loadtest/router_bench.py).

For 10, 1,000 and 10,000 routes keyed by exact host, by path prefix, and by
wildcard host, it times matching a request whose route sits in the middle of
the declaration list (never the first), and a request that matches nothing.
The numbers should stay flat as the route count grows.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastpath.router import Router, RouteSpec  # noqa: E402

ROUTE_COUNTS = (10, 1_000, 10_000)


def host_keyed(count: int) -> tuple[list[RouteSpec], str, str]:
    specs = [RouteSpec(f"r{i}", hosts=[f"svc{i}.example.com"], paths=["/"], service_path="/api") for i in range(count)]
    return specs, f"svc{count // 2}.example.com", "/users/42"


def prefix_keyed(count: int) -> tuple[list[RouteSpec], str, str]:
    specs = [RouteSpec(f"r{i}", paths=[f"/svc{i}"], service_path="/api") for i in range(count)]
    return specs, "gateway.example.com", f"/svc{count // 2}/users/42"


def wildcard_keyed(count: int) -> tuple[list[RouteSpec], str, str]:
    specs = [RouteSpec(f"r{i}", hosts=[f"*.tenant{i}.example.com"], paths=["/"]) for i in range(count)]
    return specs, f"api.tenant{count // 2}.example.com", "/users/42"


def time_per_call(call: Callable[[], object], calls: int, repeats: int) -> float:
    """Best-of-`repeats` nanoseconds per call (the minimum is the least noisy)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter_ns()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter_ns() - started) / calls)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50_000, help="matches per timing run")
    parser.add_argument("--repeats", type=int, default=15, help="timing runs per case (best is kept)")
    args = parser.parse_args()

    print(f"{'keyed by':<10} {'routes':>7} {'hit ns/match':>13} {'miss ns/match':>14}")
    for label, build in (("host", host_keyed), ("prefix", prefix_keyed), ("wildcard", wildcard_keyed)):
        for count in ROUTE_COUNTS:
            specs, host, path = build(count)
            router = Router(specs)
            expected = specs[count // 2]
            result = router.match("GET", host, path, None, 8000)
            if result is None or result.spec is not expected:
                raise SystemExit(f"{label}/{count}: matched {result!r}, wanted {expected.id}")
            match = router.match
            hit = time_per_call(lambda: match("GET", host, path, None, 8000), args.calls, args.repeats)
            miss = time_per_call(lambda: match("GET", "nobody.invalid", "/nothing", None, 8000), args.calls, args.repeats)
            print(f"{label:<10} {count:>7} {hit:>13.0f} {miss:>14.0f}")


if __name__ == "__main__":
    main()
