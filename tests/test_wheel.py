"""``python -m build`` makes an sdist and a wheel, and the wheel alone runs ppdgm in a clean venv.

The wheel is built from the sdist (``build``'s default), so a module or data file missing from
either shows up here as a failing ``ppdgm`` command, not on a user's machine. The venv has no
system site packages and does not see this checkout; CPU torch goes in first, as the Makefile
installs it, and the wheel's other dependencies come from the package index.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("build", reason="the test extra's `build` is not installed: pip install -e '.[test]'")

ROOT = Path(__file__).resolve().parents[1]


def run(*command, cwd, env, timeout=600):
    done = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, command))} exited {done.returncode}:\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.mark.timeout(1200)
def test_wheel_installs_in_a_clean_venv_and_fits(tmp_path):
    # the venv must import the installed wheel, never this checkout; its modules may write bytecode,
    # so that the second command does not compile torch, pyro and arviz from source again
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "build", "--outdir", dist, ROOT, cwd=tmp_path, env=env)
    assert len(list(dist.glob("ppdgm-*.tar.gz"))) == 1
    (wheel,) = dist.glob("ppdgm-*-py3-none-any.whl")

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path, env=env)
    python, ppdgm = venv / "bin" / "python", venv / "bin" / "ppdgm"
    # pip's byte-compile pass is skipped: modules compile on first import, and torch has thousands
    if subprocess.run([python, "-c", "import torch"], cwd=tmp_path, env=env, capture_output=True).returncode:
        run(python, "-m", "pip", "install", "-q", "--no-compile", "torch==2.13.0", cwd=tmp_path, env=env)
    run(python, "-m", "pip", "install", "-q", "--no-compile", wheel, cwd=tmp_path, env=env)

    out = tmp_path / "run"  # fit first: the bytecode it writes serves `list` too
    run(ppdgm, "fit", "ppca", "--data", "digits", "--steps", "20", "--out", out, cwd=tmp_path, env=env)
    saved = json.loads((out / "fit.json").read_text())
    assert saved["engine"] == "svi" and saved["spec"]["name"] == "ppca"
    assert len(saved["history"]["loss"]) == 20
    assert (out / "tensors.pt").stat().st_size > 0
    listing = run(ppdgm, "list", cwd=tmp_path, env=env)
    assert "ppca" in listing and "svi" in listing and "digits" in listing
