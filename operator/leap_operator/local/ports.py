"""Free TCP ports on 127.0.0.1 for rendezvous, TensorFlow workers and metrics.

Ports are checked by binding, then released for the worker to bind: a tiny race with other
programs, which a retry (the next attempt gets fresh ports) absorbs.
"""

from __future__ import annotations

import random
import socket


def bindable(port: int) -> bool:
    """Can a server listen on this port (any address)?"""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the trainers' HTTP servers do: a port whose old connections linger in TIME_WAIT is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            # The wildcard address conflicts with any bind of this port (trainers listen on 0.0.0.0).
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


class PortPicker:
    """Hands out distinct free ports; blocks of consecutive ports for per-local-rank metrics."""

    # Below Linux's ephemeral range (32768+), so outgoing connections do not take them meanwhile.
    def __init__(self, low: int = 20000, high: int = 32000, rng: random.Random | None = None):
        self.low, self.high = low, high
        self.taken: set[int] = set()
        self.rng = rng or random.Random()

    def block(self, size: int = 1) -> int:
        """First port of `size` consecutive free ports."""
        for _ in range(500):
            start = self.rng.randrange(self.low, self.high - size)
            ports = range(start, start + size)
            if not self.taken.intersection(ports) and all(bindable(p) for p in ports):
                self.taken.update(ports)
                return start
        raise RuntimeError(f"no {size} consecutive free TCP ports between {self.low} and {self.high}")

    def block_at(self, start: int, size: int = 1) -> int | None:
        """`start` when it and the size-1 ports after it are free (and not handed out), else None."""
        ports = range(start, start + size)
        if start < 1 or ports.stop > 65536 or self.taken.intersection(ports) or not all(bindable(p) for p in ports):
            return None
        self.taken.update(ports)
        return start

    def one(self) -> int:
        return self.block(1)
