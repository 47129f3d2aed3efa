"""The control process's view of the running config, and the one way to change it.

Reads follow the arena's generation word (a SIGHUP reload or another writer bumps it) and load
the snapshot when it moved. A write runs entirely under the prefix's config lock: read the
snapshot (the truth, whoever wrote it last), build and validate the new config, persist it
atomically, bump the generation. Workers poll the generation and load the same snapshot.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from ringgate.config import Config
from ringgate.config.store import config_lock, load_snapshot, save_snapshot, snapshot_path

log = logging.getLogger("ringgate.admin")

R = TypeVar("R")


class Generations(Protocol):
    """What the state needs from the shared arena."""

    @property
    def generation(self) -> int: ...

    def bump_generation(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Snapshot:
    config: Config
    generation: int
    document: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "document", self.config.to_dict())


class ConfigState:
    def __init__(self, prefix: str, arena: Generations, fallback: Config | None = None) -> None:
        self.prefix = prefix
        self.arena = arena
        generation = arena.generation
        try:
            config = load_snapshot(prefix)
        except Exception:
            if fallback is None:
                raise
            log.exception("cannot read %s; serving the config given at start", snapshot_path(prefix))
            config = fallback
        self._snapshot = Snapshot(config, generation)
        self._file_key = self._stat_key()

    @property
    def snapshot(self) -> Snapshot:
        """The running config, reloaded from the prefix when the generation moved."""
        generation = self.arena.generation
        if generation != self._snapshot.generation:
            try:
                key = self._stat_key()
                self._snapshot = Snapshot(load_snapshot(self.prefix), generation)
                self._file_key = key
            except Exception:
                log.exception("cannot load config generation %d; answering with the previous one", generation)
        return self._snapshot

    def commit(self, build: Callable[[Snapshot], tuple[Config | None, R]]) -> tuple[Snapshot, R]:
        """Run `build` on the current config under the lock; persist and publish what it returns.

        `build` validates (raising to refuse: nothing is written then) and returns the new config,
        or None to change nothing, plus a result handed back to the caller.
        """
        with config_lock(self.prefix):
            current = self._locked_current()
            config, result = build(current)
            if config is not None and config.config_hash != current.config.config_hash:
                save_snapshot(self.prefix, config)
                generation = self.arena.bump_generation()
                self._snapshot = Snapshot(config, generation)
                self._file_key = self._stat_key()
                log.info("config %s in service (Admin API write), generation %d", config.config_hash, generation)
        return self._snapshot, result

    def _locked_current(self) -> Snapshot:
        # Under the lock nobody else writes, so the cached snapshot is the truth when neither the
        # generation nor the file (a new inode on every atomic replace) changed since we read it.
        generation = self.arena.generation
        key = self._stat_key()
        if generation == self._snapshot.generation and key == self._file_key and key is not None:
            return self._snapshot
        self._snapshot = Snapshot(load_snapshot(self.prefix), generation)
        self._file_key = key
        return self._snapshot

    def _stat_key(self) -> tuple[int, int, int] | None:
        try:
            stat = os.stat(snapshot_path(self.prefix))
        except OSError:
            return None
        return stat.st_ino, stat.st_mtime_ns, stat.st_size
