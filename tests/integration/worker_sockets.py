"""Which gateway process serves a client connection, read from /proc (the product is not asked).

A keep-alive connection stays with the worker that accepted it. Its server side is the socket
whose local port is the proxy port and whose peer port is the client's local port: find that
socket's inode in /proc/net/tcp{,6}, then the process holding a descriptor on it. The same tables
tell the proxy workers (they hold the listening socket; the control process closed its copy) and
whether a new worker's event loop accepts yet (the listening socket is in its epoll set).
"""
from __future__ import annotations

import http.client
import os
import socket
import time
from collections.abc import Iterable

_TCP_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")


def _port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1], 16)


def server_socket_inode(proxy_port: int, client_port: int) -> int | None:
    for table in _TCP_TABLES:
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], int(fields[9])
            if _port_of(local) == proxy_port and _port_of(remote) == client_port and inode:
                return inode
    return None


def listening_inode(port: int) -> int | None:
    return server_socket_inode(port, 0)


def proxy_workers(children: Iterable[int], proxy_port: int) -> list[int]:
    """The children that hold the proxy's listening socket: the proxy workers (the control process
    closed its copy)."""
    inode = listening_inode(proxy_port)
    assert inode is not None, f"nothing listens on {proxy_port}"
    return sorted(pid for pid in children if holder_of(inode, [pid]) == pid)


def holder_of(inode: int, pids: Iterable[int]) -> int | None:
    wanted = f"socket:[{inode}]"
    for pid in pids:
        directory = f"/proc/{pid}/fd"
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            try:
                if os.readlink(f"{directory}/{name}") == wanted:
                    return pid
            except OSError:
                continue
    return None


def owner(sock: socket.socket, proxy_port: int, pids: Iterable[int], timeout: float = 1.0) -> int | None:
    """The pid among `pids` that accepted this connected client socket (None if none did in `timeout`)."""
    client_port = sock.getsockname()[1]
    candidates = list(pids)
    deadline = time.monotonic() + timeout
    while True:
        inode = server_socket_inode(proxy_port, client_port)
        if inode is not None:
            found = holder_of(inode, candidates)
            if found is not None:
                return found
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.005)  # accepted but not yet handed to a process: ask again


def pinned_connections(proxy_port: int, workers: list[int], per_worker: int, path: str = "/",
                       attempts: int = 200) -> dict[int, list[http.client.HTTPConnection]]:
    """Keep-alive connections, at least `per_worker` on every worker (which one accepts is the kernel's
    choice, so open connections until each has its share; extra ones are closed)."""
    pinned: dict[int, list[http.client.HTTPConnection]] = {pid: [] for pid in workers}
    for _ in range(attempts):
        if all(len(conns) >= per_worker for conns in pinned.values()):
            return pinned
        conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=10)
        conn.request("GET", path)
        conn.getresponse().read()  # the connection is accepted and served: its owner is settled
        assert conn.sock is not None
        pid = owner(conn.sock, proxy_port, workers)
        if pid is not None and len(pinned[pid]) < per_worker:
            pinned[pid].append(conn)
        else:
            conn.close()
    for conns in pinned.values():
        for conn in conns:
            conn.close()
    raise AssertionError(f"could not get {per_worker} connections on each of the workers {workers}")


def accepting(pid: int, port: int) -> bool:
    """Whether process `pid` watches the listening socket on `port` in an epoll set (its loop accepts)."""
    inode = listening_inode(port)
    directory = f"/proc/{pid}/fd"
    try:
        links = {name: os.readlink(f"{directory}/{name}") for name in os.listdir(directory)}
    except OSError:
        return False
    listening = [name for name, link in links.items() if link == f"socket:[{inode}]"]
    for name, link in links.items():
        if link != "anon_inode:[eventpoll]":
            continue
        try:
            with open(f"/proc/{pid}/fdinfo/{name}") as f:
                watched = {line.split()[1] for line in f if line.startswith("tfd:")}
        except OSError:
            continue
        if watched & set(listening):
            return True
    return False
