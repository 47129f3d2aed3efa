"""Which plugins a node can run: the bundled ones and any user class loaded by module path.

Kong's `plugins = bundled,my-plugin` becomes `--plugins bundled,mypkg.module:MyPlugin`
(RINGGATE_PLUGINS). Enabling a plugin registers its Config model with the config schema, so a
kong.yml naming a plugin that is not enabled is refused with Kong's message, and the config of
an enabled one is validated (with its defaults filled in) when the file is loaded.
"""
from __future__ import annotations

import importlib
import importlib.util

from ringgate.config import schema
from ringgate.plugins.base import Plugin

# name -> "module:Class"; imported on first use so `ringgate check` stays quick.
BUNDLED: dict[str, str] = {
    "status-based-fallback": "ringgate.plugins.fallback:FallbackPlugin",
    "request-termination": "ringgate.plugins.request_termination:RequestTerminationPlugin",
    "rate-limiting": "ringgate.plugins.rate_limiting:RateLimitingPlugin",
    "proxy-cache": "ringgate.plugins.proxy_cache:ProxyCachePlugin",
    "correlation-id": "ringgate.plugins.correlation_id:CorrelationIdPlugin",
}

_ENABLED: dict[str, type[Plugin]] = {}


class PluginLoadError(ValueError):
    pass


def load_class(spec: str) -> type[Plugin]:
    """Import "package.module:ClassName" (or "package.module", whose `Plugin` attribute is used)."""
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginLoadError(f"plugin {spec!r}: cannot import {module_name!r}: {exc}") from None
    cls = getattr(module, attribute or "Plugin", None)
    if not (isinstance(cls, type) and issubclass(cls, Plugin)) or cls is Plugin:
        raise PluginLoadError(f"plugin {spec!r}: {attribute or 'Plugin'} is not a ringgate.plugins.base.Plugin "
                              "subclass")
    if not cls.NAME:
        raise PluginLoadError(f"plugin {spec!r}: the class has no NAME")
    return cls


def _module_ships(spec: str) -> bool:
    """Whether a bundled plugin's module is part of this installation."""
    return importlib.util.find_spec(spec.partition(":")[0]) is not None


def enable(cls: type[Plugin]) -> None:
    _ENABLED[cls.NAME] = cls
    schema.KNOWN_PLUGINS[cls.NAME] = cls.Config


def enable_list(text: str) -> list[str]:
    """Enable Kong-style `bundled,mypkg.mod:Class,...`; "off" enables none. Returns the names."""
    names: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        if not item or item == "off":
            continue
        specs = list(BUNDLED.values()) if item == "bundled" else [BUNDLED.get(item, item)]
        for spec in specs:
            if item == "bundled" and not _module_ships(spec):
                continue
            cls = load_class(spec)
            enable(cls)
            names.append(cls.NAME)
    return names


def plugin_class(name: str) -> type[Plugin] | None:
    return _ENABLED.get(name)


def enabled_names() -> list[str]:
    return sorted(_ENABLED)
