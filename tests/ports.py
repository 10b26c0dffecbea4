"""A free loopback TCP port for a test's server (a Serve HTTP proxy, a Ray head, a gloo rendezvous).

Light on purpose (no pytest, no torch): ``tests/pipelines/head.py``'s script mode imports it."""

import socket


def free_port() -> int:
    """A port nothing listens on now (the OS's pick; another process could take it before it is used)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
