"""What every forked child (proxy worker, control) does first and when it is ready."""
from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def prepare_child() -> None:
    """Die with the master; leave Ctrl-C and SIGHUP to it (it stops us by SIGTERM)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def report_ready(ready_fd: int, token: bytes) -> None:
    # A respawned child's master is not listening for this any more; that is fine.
    try:
        os.write(ready_fd, token)
    except OSError:
        pass
    os.close(ready_fd)
