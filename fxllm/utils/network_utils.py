"""Host and port helpers vLLM scripts use (``vllm.utils.network_utils``)."""

from __future__ import annotations

import socket


def get_open_port() -> int:
    """A TCP port free on this host right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def get_ip() -> str:
    """This host's address on its default route (loopback when it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))  # no packet is sent: UDP connect only picks a route
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"
