"""Ringgate's declarative configuration: Kong's kong.yml format, schema, defaults and snapshot."""

from ringgate.config.declarative import Config, load_dict, load_file, load_text
from ringgate.config.errors import ConfigError, Problem
from ringgate.config.schema import (
    KNOWN_PLUGINS,
    Healthchecks,
    Plugin,
    Route,
    Service,
    Target,
    Upstream,
)

__all__ = [
    "KNOWN_PLUGINS",
    "Config",
    "ConfigError",
    "Healthchecks",
    "Plugin",
    "Problem",
    "Route",
    "Service",
    "Target",
    "Upstream",
    "load_dict",
    "load_file",
    "load_text",
]
