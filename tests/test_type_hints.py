"""Type hints are checked: mypy (settings in pyproject.toml's [tool.mypy]) finds no error in the typed core.

Covers gen_jax/ddpm, gen_jax/train, gen_jax/flash and gen_jax/config.py (the `files` of [tool.mypy]); about
15 s of CPU from a cold cache, a few seconds with the cache in .mypy_cache.
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mypy_finds_no_type_errors():
    pytest.importorskip("mypy", reason="mypy comes with the test extra: pip install -e '.[test]'")
    proc = subprocess.run([sys.executable, "-m", "mypy", "--no-color-output", "--no-error-summary"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"mypy found type errors:\n{proc.stdout}{proc.stderr}"
