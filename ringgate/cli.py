"""`ringgate` command line: start, check, demo, stop, reload."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any, Sequence

from ringgate import __version__
from ringgate.settings import Settings, SettingsError, coerce, from_environment

LOG_FORMAT = "%(asctime)s [%(levelname)s] %(process)d %(name)s: %(message)s"


def _add_node_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--proxy-listen", metavar="HOST:PORT [ssl], ...", help="proxy addresses in Kong's listen "
                        "syntax, e.g. '0.0.0.0:8000, 0.0.0.0:8443 ssl' (default 0.0.0.0:8000; env RINGGATE_PROXY_LISTEN)")
    parser.add_argument("--admin-listen", metavar="HOST:PORT", help="admin address (default 127.0.0.1:8001; "
                        "env RINGGATE_ADMIN_LISTEN)")
    parser.add_argument("--workers", metavar="N", help="proxy worker processes (default: one per core; "
                        "env RINGGATE_WORKERS)")
    parser.add_argument("--prefix", metavar="DIR", help="run directory for pid file and state "
                        "(default ./ringgate-run; env RINGGATE_PREFIX)")
    parser.add_argument("--trusted-ips", metavar="CIDRS", help="comma-separated peers whose X-Forwarded-* "
                        "headers are kept (default none; env RINGGATE_TRUSTED_IPS)")
    parser.add_argument("--drain-timeout", metavar="SECONDS", help="graceful stop limit (default 10; "
                        "env RINGGATE_DRAIN_TIMEOUT)")
    parser.add_argument("--access-log", metavar="PATH", help="one JSON line per request to PATH or 'stdout' "
                        "(default off; env RINGGATE_ACCESS_LOG)")
    parser.add_argument("--plugins", metavar="LIST", help="plugins this node can run: bundled and/or "
                        "module:Class, comma-separated (default bundled; env RINGGATE_PLUGINS)")
    parser.add_argument("--shared-dict-capacity", metavar="N", help="entries of the plugins' shared dict "
                        "(default 65536; env RINGGATE_SHARED_DICT_CAPACITY)")
    parser.add_argument("--cache-capacity", metavar="N", help="answers the shared cache keeps, up to 64 KiB each "
                        "(default 1024; env RINGGATE_CACHE_CAPACITY)")
    parser.add_argument("--health-capacity", metavar="N", help="target health blocks in shared memory "
                        "(default 4096; env RINGGATE_HEALTH_CAPACITY)")
    parser.add_argument("--admin-token", metavar="TOKEN", help="require this token on every Admin API request "
                        "(Authorization: Bearer or Kong-Admin-Token; prefer env RINGGATE_ADMIN_TOKEN, a flag "
                        "shows in the process list)")
    parser.add_argument("--log-level", metavar="LEVEL", help="debug, info, warning, error (default info; "
                        "env RINGGATE_LOG_LEVEL)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ringgate", description="A Kong-compatible API gateway.")
    parser.add_argument("--version", action="version", version=f"ringgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="run the gateway in the foreground")
    start.add_argument("-c", "--conf", metavar="kong.yml", help="declarative config (env RINGGATE_CONFIG_FILE)")
    _add_node_flags(start)
    check = sub.add_parser("check", help="validate a declarative config file")
    check.add_argument("file")
    check.add_argument("--plugins", metavar="LIST", help="plugins enabled (default bundled; env RINGGATE_PLUGINS)")
    demo = sub.add_parser("demo", help="start the gateway with built-in demo upstreams")
    _add_node_flags(demo)
    stop = sub.add_parser("stop", help="stop a running gateway (via its pid file)")
    stop.add_argument("--prefix", metavar="DIR")
    stats = sub.add_parser("stats", help="print the running gateway's counters (its msgpack stats socket)")
    stats.add_argument("--prefix", metavar="DIR")
    stats.add_argument("--json", action="store_true", help="the whole stats document as JSON")
    reload = sub.add_parser("reload", help="re-read the -c file of a running gateway (SIGHUP via its pid file)")
    reload.add_argument("--prefix", metavar="DIR")
    return parser


def resolve_settings(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Settings:
    """Defaults < RINGGATE_* environment < flags, as Kong does with KONG_* and kong.conf."""
    values: dict[str, Any] = from_environment(environ)
    for name in ("proxy_listen", "admin_listen", "workers", "prefix", "trusted_ips", "drain_timeout", "log_level",
                 "health_capacity", "admin_token", "plugins", "shared_dict_capacity", "cache_capacity",
                 "access_log"):
        raw = getattr(args, name, None)
        if raw is not None:
            values[name] = coerce(name, raw)
    conf = getattr(args, "conf", None)
    if conf is not None:
        values["config_file"] = conf
    settings = Settings().with_overrides(**values)
    if settings.workers < 0:
        raise SettingsError("RINGGATE_WORKERS: must be 0 (one per core) or more")
    return settings


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=LOG_FORMAT, stream=sys.stderr)


def _enable_plugins(text: str) -> None:
    """Before any config is read: a kong.yml may only name plugins enabled here (Kong's rule)."""
    from ringgate.plugins.registry import PluginLoadError, enable_list
    try:
        enable_list(text)
    except PluginLoadError as exc:
        raise SettingsError(f"RINGGATE_PLUGINS: {exc}") from None


def cmd_check(path: str) -> int:
    from ringgate.config import ConfigError, load_file
    try:
        config = load_file(path)
    except ConfigError as exc:
        print(f"ringgate: {exc}", file=sys.stderr)
        return 1
    print(f"ringgate: {path} is valid: {len(config.services)} services, {len(config.routes)} routes, "
          f"{len(config.upstreams)} upstreams, {len(config.plugins)} plugins (hash {config.config_hash})")
    return 0


def cmd_start(settings: Settings) -> int:
    from ringgate.config import ConfigError, load_file
    if not settings.config_file and os.path.exists(_snapshot_path(settings)):
        return _restore(settings)
    if not settings.config_file:
        logging.getLogger("ringgate").warning("no config given (-c kong.yml): every request will get 404")
        return cmd_start_config(settings, {"_format_version": "3.0"}, "<empty>")
    try:
        config = load_file(settings.config_file)
    except ConfigError as exc:
        print(f"ringgate: {exc}", file=sys.stderr)
        return 1
    return _run(settings, config, settings.config_file)


def _snapshot_path(settings: Settings) -> str:
    from ringgate.config.store import snapshot_path
    return snapshot_path(settings.prefix)


def _restore(settings: Settings) -> int:
    """Start without -c: the config persisted under the prefix (Admin API writes included) comes back."""
    from ringgate.config import ConfigError
    from ringgate.config.store import load_snapshot
    path = _snapshot_path(settings)
    try:
        config = load_snapshot(settings.prefix)
    except (ConfigError, OSError, ValueError) as exc:
        print(f"ringgate: cannot restore {path}: {exc} (start with -c kong.yml, or remove the file)", file=sys.stderr)
        return 1
    logging.getLogger("ringgate").info("restored config from %s (%s)", path, config.config_hash)
    return _run(settings, config, path)


def cmd_start_config(settings: Settings, data: dict[str, Any], label: str) -> int:
    from ringgate.config import ConfigError, load_dict
    try:
        config = load_dict(data, label)
    except ConfigError as exc:
        print(f"ringgate: {exc}", file=sys.stderr)
        return 1
    return _run(settings, config, label)


def _run(settings: Settings, config: Any, label: str) -> int:
    from workers.master import StartupError, run
    try:
        return run(settings, config, label)
    except StartupError as exc:
        print(f"ringgate: {exc}", file=sys.stderr)
        return 1


def _is_ringgate(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"ringgate" in f.read()
    except FileNotFoundError:
        return False
    except OSError:
        return True  # no /proc to ask: trust the pid file, as before


def cmd_signal(prefix: str, signo: signal.Signals, what: str) -> int:
    from ringgate.settings import PID_FILE
    path = os.path.join(prefix, PID_FILE)
    try:
        with open(path) as f:
            pid = int(f.read().strip())
        if not _is_ringgate(pid):
            # A master killed with SIGKILL leaves its pid file; the pid may belong to someone else now.
            print(f"ringgate: {path} names pid {pid}, which is not a running ringgate (a stale pid file?)",
                  file=sys.stderr)
            return 1
        os.kill(pid, signo)
    except (OSError, ValueError) as exc:
        print(f"ringgate: cannot {what} the gateway under {prefix}: {exc}", file=sys.stderr)
        return 1
    print(f"ringgate: sent {signo.name} to {pid}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = resolve_settings(args)
        if args.command in ("start", "check", "demo"):  # only what reads a config needs the plugins
            _enable_plugins(settings.plugins)
    except SettingsError as exc:
        print(f"ringgate: {exc}", file=sys.stderr)
        return 2
    if args.command == "check":
        return cmd_check(args.file)
    if args.command == "stop":
        return cmd_signal(settings.prefix, signal.SIGTERM, "stop")
    if args.command == "reload":
        return cmd_signal(settings.prefix, signal.SIGHUP, "reload")
    if args.command == "stats":
        from ringgate.stats_cli import run as print_stats
        return print_stats(settings.prefix, args.json, sys.stdout)
    _setup_logging(settings.log_level)
    if args.command == "demo":
        from ringgate.demo import run_demo
        return run_demo(settings)
    return cmd_start(settings)
