"""A missing system dependency skips its tests locally (saying why) and fails them under CI."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

NEEDS_MISSING = '''
from conftest import needs_system

@needs_system(["no-such-package"], "the imaginary recipe")
def test_uses_it():
    pass

@needs_system([], "a recipe whose packages are installed")
def test_present():
    pass
'''


@pytest.mark.parametrize("ci", ["true", ""])
def test_missing_system_package_fails_under_ci_and_is_skipped_with_a_reason_elsewhere(tmp_path, ci):
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "test_it.py").write_text(NEEDS_MISSING)
    env = dict(os.environ, CI=ci, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          str(tmp_path)], capture_output=True, text=True, env=env, cwd=tmp_path)
    out = res.stdout + res.stderr
    assert "no-such-package not installed (`make sysdeps`)" in out
    if ci:
        assert res.returncode == 1 and "1 passed, 1 error" in out  # failed in setup
    else:
        assert res.returncode == 0 and "1 passed, 1 skipped" in out and "SKIPPED" in out


@pytest.mark.parametrize("ci, code", [("true", 1), ("", 0)])
def test_sysdeps_script_fails_under_ci_when_it_cannot_install(tmp_path, ci, code):
    # No apt-get on PATH: the script cannot install anything.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dpkg-query", "grep", "id", "bash"):
        for d in os.environ["PATH"].split(os.pathsep):
            if (Path(d) / tool).exists():
                (bin_dir / tool).symlink_to(Path(d) / tool)
                break
    env = dict(os.environ, CI=ci, PATH=str(bin_dir))
    res = subprocess.run([str(bin_dir / "bash"), str(ROOT / "scripts" / "sysdeps.sh"),
                          "no-such-package"], capture_output=True, text=True, env=env)
    assert res.returncode == code, res.stderr
    assert "no apt-get here" in res.stderr
