"""The running config, persisted under the prefix: written atomically, read back by every process.

The master writes a new snapshot only after it validated it, then bumps the arena's
generation; workers and the control process notice the new generation and load the
snapshot. A crash in the middle of a write leaves the previous snapshot in place
(write to a temporary file, fsync, rename, fsync the directory).

Every writer (the master's SIGHUP reload, the control process's Admin API) does its
read-check-write-publish step under `config_lock`, so two writers never interleave.
"""
from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager

import orjson

from ringgate.config.declarative import Config, load_dict

SNAPSHOT_FILE = "config.json"
LOCK_FILE = "config.lock"


def snapshot_path(prefix: str) -> str:
    return os.path.join(prefix, SNAPSHOT_FILE)


def save_snapshot(prefix: str, config: Config) -> str:
    path = snapshot_path(prefix)
    tmp = f"{path}.{os.getpid()}.tmp"
    data = orjson.dumps(config.to_dict(), option=orjson.OPT_INDENT_2)
    # 0600: the snapshot holds private keys of the configured certificates.
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
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
    """The running config. It was validated when written, so a certificate that expired since
    is loaded (with a warning) instead of failing a worker's restart and crash-looping the node."""
    path = snapshot_path(prefix)
    with open(path, "rb") as f:
        document = orjson.loads(f.read())
    if not (document.get("certificates") or document.get("ca_certificates")):
        # Nothing for ringgate.tls to check: do not import it (and `cryptography`, ~150 ms) on a
        # worker's event loop at its first reload.
        return load_dict(document, path)
    from ringgate.tls import validity_unchecked
    with validity_unchecked():
        return load_dict(document, path)


def snapshot_hash(prefix: str) -> str | None:
    """The running config's hash, read without validating the snapshot again (None if unreadable).

    The snapshot is `to_dict()` of a validated config, and config_hash is the md5 of that
    document's canonical JSON, so hashing the file's document gives the same value."""
    import hashlib
    try:
        with open(snapshot_path(prefix), "rb") as f:
            document = orjson.loads(f.read())
    except (OSError, orjson.JSONDecodeError):
        return None
    canonical = orjson.dumps(document, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    return hashlib.md5(canonical).hexdigest()


@contextmanager
def config_lock(prefix: str) -> Iterator[None]:
    """Exclusive, cross-process lock for changing the snapshot (blocking; not re-entrant).

    flock on `<prefix>/config.lock`: the kernel releases it when the holder's file is closed,
    including when the holder dies, so a killed writer never leaves the config locked.
    """
    fd = os.open(os.path.join(prefix, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
