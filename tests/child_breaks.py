"""A task module that imports in the dispatcher but not in its worker children."""
from __future__ import annotations

import multiprocessing

from dispatcher import task

if multiprocessing.parent_process() is not None:
    raise ImportError("this module refuses to import in a worker child")


@task(name="t.never")
def never() -> None:
    return None
