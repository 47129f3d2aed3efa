"""The running config, persisted under the prefix: written atomically, read back by every process.

The master writes a new snapshot only after it validated it, then bumps the arena's
generation; workers and the control process notice the new generation and load the
snapshot. A crash in the middle of a write leaves the previous snapshot in place
(write to a temporary file, fsync, rename, fsync the directory).
"""
from __future__ import annotations

import os

import orjson

from ringgate.config.declarative import Config, load_dict

SNAPSHOT_FILE = "config.json"


def snapshot_path(prefix: str) -> str:
    return os.path.join(prefix, SNAPSHOT_FILE)


def save_snapshot(prefix: str, config: Config) -> str:
    path = snapshot_path(prefix)
    tmp = f"{path}.{os.getpid()}.tmp"
    data = orjson.dumps(config.to_dict(), option=orjson.OPT_INDENT_2)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(prefix, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


def load_snapshot(prefix: str) -> Config:
    path = snapshot_path(prefix)
    with open(path, "rb") as f:
        return load_dict(orjson.loads(f.read()), path)
