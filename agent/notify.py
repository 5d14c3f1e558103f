"""systemd's notify protocol (sd_notify(3)): READY, STOPPING, STATUS and WATCHDOG messages to $NOTIFY_SOCKET.

A datagram to a Unix socket; a no-op when not started by systemd (no NOTIFY_SOCKET). Ten lines of protocol do not
justify a dependency on libsystemd.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # an abstract socket
            address = "\0" + address[1:]
        self._address = address or None
        watchdog_usec = os.environ.get("WATCHDOG_USEC", "")
        self.watchdog_s = int(watchdog_usec) / 1e6 if watchdog_usec.isdigit() else None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *fields: str) -> None:
        if self._address is None:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto("\n".join(fields).encode(), self._address)
            except OSError:
                pass  # systemd went away or the socket is gone: nothing to tell, nothing to fail
