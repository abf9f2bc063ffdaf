"""The short chaos run: children, dispatchers and Redis killed at random moments; nothing lost."""
from __future__ import annotations

import subprocess
import sys

import pytest

from procs import ROOT


@pytest.mark.timeout(300)
@pytest.mark.parametrize("flags", [[], ["--prefetch", "8", "--highs", "100"]], ids=["plain", "high-lane"])
def test_short_chaos_run_loses_nothing(flags):
    """The second run has prefetched tasks handed back for high ones pushed during the chaos."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "chaos.py"), "-n", "300", "-k", "5", *flags],
                          capture_output=True, text=True, timeout=280)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "lost: 0" in proc.stdout and "completed_unique: 300" in proc.stdout
