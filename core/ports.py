"""Whether this process could listen on an address: checked before a server starts (and
before a worker joins its group), so a port in use is one line, not a traceback or a
rebalance."""

from __future__ import annotations

import socket


def cannot_listen(host: str, port: int) -> str | None:
    """Why `host:port` cannot be listened on (the OS's reason), or None when it can."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind it
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None
