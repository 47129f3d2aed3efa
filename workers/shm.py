"""The node's shared memory besides the arena and the health table, mapped by the master before fork.

- shdict: an ngx.shared-like dict for plugins' counters (rate limits, fallback counts);
- cache:  a dict with large values for cached answers (proxy-cache, the fallback chain's cache step);
- series: per-worker labelled counters (requests by route and code, latency histograms).
Sizes are settings (flags and RINGGATE_* variables); untouched pages cost no memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from shared_state.series import SeriesTable
from shared_state.shdict import SharedDict

if TYPE_CHECKING:
    from ringgate.settings import Settings

CACHE_VALUE_MAX = 64 * 1024


@dataclass
class NodeMemory:
    shdict: SharedDict
    cache: SharedDict
    series: SeriesTable


def create_node_memory(settings: Settings) -> NodeMemory:
    return NodeMemory(
        shdict=SharedDict(settings.shared_dict_capacity, key_max=128, value_max=256),
        cache=SharedDict(settings.cache_capacity, key_max=256, value_max=CACHE_VALUE_MAX),
        series=SeriesTable(settings.worker_count + 1),
    )
