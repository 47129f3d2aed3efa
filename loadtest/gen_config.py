"""Generate the benchmark's configurations: the nginx origin, the nginx proxy with N prefix
locations, and an equivalent Kong declarative kong.yml with N routes for Ringgate.

Both proxies get the same route set. The route that must win is deep in the list, and the first
routes ("decoys") are shorter prefixes of the benchmarked path. A router that returned the first
match in declaration order would therefore pick a decoy; because of strip_path the origin would
then see "/v1/bench/small" and answer 404, which the benchmark's pre-flight check rejects.

Usable as a module (bench.py imports it) or on its own:
    python loadtest/gen_config.py --out-dir /tmp/x --origin-port 9001 --proxy-port 9002
"""
from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

LOADTEST_DIR = Path(__file__).resolve().parent
ORIGIN_TEMPLATE = LOADTEST_DIR / "nginx_origin.conf.tmpl"
PROXY_TEMPLATE = LOADTEST_DIR / "nginx_proxy.conf.tmpl"

# Shorter prefixes of TARGET_PREFIX, declared first, so that longest-prefix matching is exercised.
DECOY_PREFIXES: tuple[str, ...] = ("/api/", "/api/v1/", "/api/v1/b")
TARGET_PREFIX = "/api/v1/bench/"
SERVICE_NAME = "origin"
UPSTREAM_NAME = "origin"

_PLACEHOLDER = re.compile(r"@([A-Z][A-Z0-9_]*)@")


@dataclass(frozen=True)
class RouteSet:
    """Route prefixes in declaration order; `prefixes[target_index]` is the one the benchmark hits."""

    prefixes: tuple[str, ...]
    target_index: int

    @property
    def target_prefix(self) -> str:
        return self.prefixes[self.target_index]


def build_route_set(count: int = 1000, target_index: int | None = None) -> RouteSet:
    """Return `count` distinct prefix routes: decoys first, the target at `target_index`
    (default: three quarters of the way down), filler routes `/api/v1/svcNNNN/` elsewhere."""
    minimum = len(DECOY_PREFIXES) + 1
    if count < minimum:
        raise ValueError(f"need at least {minimum} routes, got {count}")
    if target_index is None:
        target_index = max(len(DECOY_PREFIXES), (count * 3) // 4)
    if not len(DECOY_PREFIXES) <= target_index < count:
        raise ValueError(f"target_index must be in [{len(DECOY_PREFIXES)}, {count}), got {target_index}")
    prefixes: list[str] = list(DECOY_PREFIXES)
    filler_number = 0
    while len(prefixes) < count:
        if len(prefixes) == target_index:
            prefixes.append(TARGET_PREFIX)
        else:
            prefixes.append(f"/api/v1/svc{filler_number:04d}/")
            filler_number += 1
    return RouteSet(prefixes=tuple(prefixes), target_index=target_index)


def render_template(text: str, values: Mapping[str, str]) -> str:
    """Replace every `@NAME@` in `text`; a placeholder without a value, or a value nobody
    asked for, is an error (it would otherwise surface later as a confusing nginx failure)."""
    used: set[str] = set()

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise KeyError(f"template placeholder @{name}@ has no value")
        used.add(name)
        return values[name]

    rendered = _PLACEHOLDER.sub(substitute, text)
    unused = set(values) - used
    if unused:
        raise KeyError(f"values not used by the template: {sorted(unused)}")
    return rendered


def _check_nginx_safe(value: str, what: str) -> None:
    # Values land inside nginx directives and quoted strings; keep them to a plain alphabet.
    if not re.fullmatch(r"[A-Za-z0-9_./:-]+", value):
        raise ValueError(f"{what} contains characters unsafe for an nginx config: {value!r}")


def nginx_origin_conf(
    prefix_dir: Path, port: int, small_body: str, large_file: Path,
    backup_port: int | None = None, failing_port: int | None = None,
) -> str:
    """The origin: `/small` returns `small_body` from the config, `/large` serves `large_file`.
    Optional extra listeners for bench.py's variants: `backup_port` serves the same two paths (a
    fallback's backup), `failing_port` answers 503 to everything (a primary that is down)."""
    _check_nginx_safe(str(prefix_dir), "prefix dir")
    _check_nginx_safe(small_body, "small body")
    _check_nginx_safe(str(large_file), "large file path")
    rendered = render_template(
        ORIGIN_TEMPLATE.read_text(),
        {"PREFIX": str(prefix_dir), "PORT": str(port), "SMALL_BODY": small_body, "LARGE_FILE": str(large_file)},
    )
    extra = ""
    if backup_port is not None:
        extra += _origin_backup_server(backup_port, small_body, large_file)
    if failing_port is not None:
        extra += _origin_failing_server(failing_port)
    if not extra:
        return rendered
    # The extra server blocks go inside the http block, whose closing brace ends the file.
    http_end = rendered.rstrip().rindex("}")
    return rendered[:http_end] + extra + rendered[http_end:]


def _origin_backup_server(port: int, small_body: str, large_file: Path) -> str:
    return (
        f"\n    # A second listener with the same answers: the backup of a fallback.\n"
        f"    server {{\n        listen 127.0.0.1:{port};\n"
        f"        location = /small {{\n            default_type text/plain;\n"
        f"            return 200 \"{small_body}\";\n        }}\n"
        f"        location = /large {{\n            alias {large_file};\n        }}\n"
        f"        location / {{\n            return 404;\n        }}\n    }}\n"
    )


def _origin_failing_server(port: int) -> str:
    return (
        f"\n    # A primary that is down: 503 to every request.\n"
        f"    server {{\n        listen 127.0.0.1:{port};\n"
        f"        location / {{\n            default_type text/plain;\n"
        f"            return 503 \"primary down\";\n        }}\n    }}\n"
    )


def nginx_locations(routes: RouteSet) -> str:
    """One prefix `location` per route. `proxy_pass` with a URI replaces the matched prefix,
    which is what Kong's strip_path=true does with a service that has no path."""
    blocks = []
    for prefix in routes.prefixes:
        _check_nginx_safe(prefix, "route prefix")
        blocks.append(f"        location {prefix} {{\n            proxy_pass http://{UPSTREAM_NAME}/;\n        }}\n")
    return "".join(blocks)


def nginx_proxy_conf(prefix_dir: Path, port: int, origin_port: int, routes: RouteSet) -> str:
    _check_nginx_safe(str(prefix_dir), "prefix dir")
    return render_template(
        PROXY_TEMPLATE.read_text(),
        {
            "PREFIX": str(prefix_dir),
            "PORT": str(port),
            "ORIGIN_PORT": str(origin_port),
            "UPSTREAM": UPSTREAM_NAME,
            "LOCATIONS": nginx_locations(routes).rstrip("\n"),
        },
    )


def route_name(index: int) -> str:
    """The kong.yml name of the route at `index` (bench.py's variants attach plugins to it by name)."""
    return f"r{index:04d}"


def kong_declarative_config(origin_port: int, routes: RouteSet) -> dict[str, object]:
    """Kong 3.0 declarative config: one service pointing at the origin, one route per prefix
    (Kong defaults apply: strip_path true, path_handling v0, preserve_host false)."""
    return {
        "_format_version": "3.0",
        "services": [
            {
                "name": SERVICE_NAME,
                "url": f"http://127.0.0.1:{origin_port}",
                "routes": [
                    {"name": route_name(index), "paths": [prefix]} for index, prefix in enumerate(routes.prefixes)
                ],
            }
        ],
    }


def kong_yml(origin_port: int, routes: RouteSet) -> str:
    header = "# Generated by loadtest/gen_config.py for the side-by-side benchmark against nginx.\n"
    return header + yaml.safe_dump(kong_declarative_config(origin_port, routes), sort_keys=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write nginx_proxy.conf and kong.yml with the same N prefix routes.")
    parser.add_argument("--out-dir", type=Path, required=True, help="directory to write into (created if missing)")
    parser.add_argument("--origin-port", type=int, required=True)
    parser.add_argument("--proxy-port", type=int, required=True, help="listen port of the nginx proxy")
    parser.add_argument("--routes", type=int, default=1000, help="number of routes (default 1000)")
    parser.add_argument("--target-index", type=int, default=None, help="position of the benchmarked route")
    args = parser.parse_args(argv)

    routes = build_route_set(args.routes, args.target_index)
    out_dir: Path = args.out_dir.resolve()
    # nginx needs the log and temp directories of its prefix to exist before it starts.
    for sub in ("logs", "tmp"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    (out_dir / "nginx_proxy.conf").write_text(nginx_proxy_conf(out_dir, args.proxy_port, args.origin_port, routes))
    (out_dir / "kong.yml").write_text(kong_yml(args.origin_port, routes))
    print(f"wrote {out_dir / 'nginx_proxy.conf'} and {out_dir / 'kong.yml'}: {len(routes.prefixes)} routes, "
          f"benchmarked route #{routes.target_index} {routes.target_prefix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
