"""Facts about this machine that the server code needs: live processes, free ports, log tails."""
from __future__ import annotations

import os
import socket
from pathlib import Path


def pid_alive(pid: int | None) -> bool:
    """True for a running process; a zombie (exited, not yet reaped) counts as gone."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): the signal test is all there is
    return stat.rpartition(")")[2].split()[0] != "Z"


def bind_port(host: str, port: int, reuse: bool = False) -> int | None:
    """Bind a throwaway socket: the port the kernel gave (any free one for 0), None if taken.

    reuse=True binds the way Redis does, so a port left in TIME_WAIT still counts as free.
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        if reuse:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return None
        return sock.getsockname()[1]


def log_tail(path: Path, offset: int, lines: int = 20) -> str:
    """The last lines written to a log file after ``offset`` (for an error message)."""
    try:
        with open(path, "rb") as log:
            log.seek(offset)
            return "\n".join(log.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
