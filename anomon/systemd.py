"""systemd's notify protocol (sd_notify(3)): READY, STOPPING and watchdog pings, no dependency.

Under `Type=notify` systemd starts dependants only once the daemon says READY=1, and with
`WatchdogSec=` it restarts a daemon whose pings stop. Outside systemd (no NOTIFY_SOCKET) every
call here is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("anomon.systemd")



def sd_notify(message: str) -> bool:
    """Send one sd_notify(3) datagram if NOTIFY_SOCKET is set; plain socket, no dependency."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):  # abstract namespace
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError as e:
        log.warning("sd_notify(%s) failed: %s", message.split("\n")[0], e)
        return False


def watchdog_interval() -> float | None:
    """Half of systemd's WatchdogSec (as systemd advises), or every 10 s if only notify is set."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return None
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 else 10.0
