"""Plugins used by test_plugin_contract.py, loaded by the gateway through --plugins module:Class."""
from __future__ import annotations

from typing import Any

from ringgate.plugins.base import Context, Plugin, PluginConfig


class TagConfig(PluginConfig):
    tag: str = "global"


class TagPlugin(Plugin):
    """Says which instance ran (scoping) and leaves a trail in ctx.shared (order of phases/priority)."""

    NAME = "tag"
    PRIORITY = 20
    Config = TagConfig

    def access(self, ctx: Context) -> None:
        ctx.shared.setdefault("trail", []).append(f"tag:{self.config.tag}")
        ctx.set_upstream_header("X-Tag", self.config.tag)

    def header_filter(self, ctx: Context, status: int, headers: list[tuple[str, str]]) -> None:
        ctx.set_response_header("X-Tag", self.config.tag)
        ctx.set_response_header("X-Trail", ",".join(ctx.shared.get("trail", [])))


class LaterPlugin(Plugin):
    NAME = "later"
    PRIORITY = 10

    def access(self, ctx: Context) -> None:
        ctx.shared.setdefault("trail", []).append("later")


class BoomConfig(PluginConfig):
    phase: str = "access"


class BoomPlugin(Plugin):
    """Raises in the phase named by the request's X-Boom header."""

    NAME = "boom"
    PRIORITY = 5
    Config = BoomConfig

    def access(self, ctx: Context) -> None:
        if ctx.header("X-Boom") == "access":
            raise RuntimeError("boom in access")

    def header_filter(self, ctx: Context, status: int, headers: list[tuple[str, str]]) -> None:
        if ctx.header("X-Boom") == "header_filter":
            raise RuntimeError("boom in header_filter")


class CountConfig(PluginConfig):
    pass


class ChunkCounterPlugin(Plugin):
    """Observes every body piece (no buffering) and reports how many it saw in the log phase."""

    NAME = "chunk-counter"
    PRIORITY = 1
    Config = CountConfig
    seen: dict[str, Any] = {}

    def body_filter(self, ctx: Context, chunk: bytes, eof: bool) -> bytes | None:
        ctx.plugin["pieces"] = ctx.plugin.get("pieces", 0) + (1 if chunk else 0)
        return None

    def log(self, ctx: Context) -> None:
        import logging
        logging.getLogger("ringgate.test").warning("chunk-counter %s saw %d pieces", ctx.path,
                                                   ctx.plugin.get("pieces", 0))
