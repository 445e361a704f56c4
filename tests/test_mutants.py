"""tools/mutants: realistic one-line bugs, each of which some test must catch (issue 22).

The anchor check is quick and runs always, so a code change that moves an anchor fails here
(re-anchor the mutant, same bug, in tools/mutants). The full run copies the repository once per
mutant and runs each mutant's tests there (2 workers).
"""
import subprocess
import sys

import pytest

from tests.conftest import ROOT

MUTANTS = ROOT / "tools" / "mutants"


def test_every_mutant_is_anchored_exactly_once():
    r = subprocess.run([sys.executable, str(MUTANTS), "--list"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(r.stdout.splitlines()) >= 15


@pytest.mark.slow
def test_no_mutant_survives():
    r = subprocess.run([sys.executable, str(MUTANTS), "--workers", "2"], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    print(r.stdout)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
