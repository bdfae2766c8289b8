"""Data-parallel SVI on torch.distributed (gloo, loopback, 2 processes launched by torchrun)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ppdgm

SCRIPTS = Path(__file__).parent / "scripts"
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def launch(script, *args, nproc=1, timeout=120):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "PPDGM_BACKEND": "gloo",
        "PPDGM_DIST_TIMEOUT": "30",
    }
    if nproc == 1:
        cmd = [sys.executable, str(SCRIPTS / script), *map(str, args)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "--monitor_interval=0.5",
            str(SCRIPTS / script),
            *map(str, args),
        ]
    t0 = time.monotonic()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return r, time.monotonic() - t0


def test_two_ranks_of_batch_b_equal_one_process_of_batch_2b(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    r1, _ = launch("train_dist.py", one, 40, 48)
    r2, _ = launch("train_dist.py", two, 40, 24, nproc=2)
    assert r1.returncode == 0, r1.stderr[-2000:]
    assert r2.returncode == 0, r2.stderr[-2000:]
    a, b = ppdgm.load(one), ppdgm.load(two)
    assert len(a.history["loss"]) == len(b.history["loss"]) == 40
    assert torch.allclose(torch.tensor(a.history["loss"]), torch.tensor(b.history["loss"]), rtol=1e-4)
    for name, value in a.params["params"].items():
        assert torch.allclose(value, b.params["params"][name], atol=1e-5), name


def test_rbm_under_pcd_two_ranks_equal_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    r1, _ = launch("train_rbm_dist.py", one, 30, 48, 2)  # one process, the same two chain blocks
    r2, _ = launch("train_rbm_dist.py", two, 30, 24, 2, nproc=2)
    assert r1.returncode == 0, r1.stderr[-2000:]
    assert r2.returncode == 0, r2.stderr[-2000:]
    a, b = ppdgm.load(one), ppdgm.load(two)
    assert torch.allclose(torch.tensor(a.history["loss"]), torch.tensor(b.history["loss"]), rtol=1e-4, atol=1e-5)
    assert a.samples["chain_energy"].shape == b.samples["chain_energy"].shape  # gathered from both ranks
    assert torch.allclose(a.samples["chain_energy"], b.samples["chain_energy"], atol=1e-4)
    sa, sb = a.module.state_dict(), b.module.state_dict()
    for name in sa:
        if name.endswith("_extra_state"):  # the kept chains: each rank keeps its own block, rank 0 the first
            ca, cb = sa[name]["chains"], sb[name]["chains"]
            assert 2 * len(cb) == len(ca) and torch.equal(cb, ca[: len(cb)])
            continue
        assert torch.allclose(sa[name], sb[name], atol=1e-5), name


def test_nuts_chains_on_two_ranks_merge_into_one_inference_data(tmp_path):
    r1, _ = launch("nuts_dist.py", tmp_path / "one")
    r2, _ = launch("nuts_dist.py", tmp_path / "two", nproc=2)
    assert r1.returncode == 0, r1.stderr[-2000:]
    assert r2.returncode == 0, r2.stderr[-2000:]
    a, b = ppdgm.load(tmp_path / "one"), ppdgm.load(tmp_path / "two")
    assert b.samples["mu"].shape == (2, 150)
    assert torch.equal(a.samples["mu"], b.samples["mu"])  # chain c's draws do not depend on the process
    import sys as _sys

    _sys.path.insert(0, str(SCRIPTS))
    from nuts_dist import model, y

    b.model, b.args = model, (y,)
    idata = b.to_arviz()
    assert idata.posterior.sizes["chain"] == 2 and idata.log_likelihood["y"].dims == ("chain", "draw", "obs")


@pytest.mark.parametrize("family", ["gan", "score"])
def test_adversarial_and_score_matching_ranks_stay_in_sync(tmp_path, family):
    r, _ = launch("train_gan_score_dist.py", tmp_path, family, nproc=2)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    for name in a:  # broadcast start + averaged gradients keep every rank's weights identical
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    la, lb = (torch.load(tmp_path / f"loss{i}.pt", weights_only=True) for i in (0, 1))
    assert torch.isfinite(la).all() and torch.equal(la, lb)  # the history is the all-reduced loss


def test_a_killed_rank_stops_the_job_and_a_rerun_resumes(tmp_path):
    out = tmp_path / "run"
    r, seconds = launch("train_dist.py", out, 40, 24, "--kill-rank", 1, "--kill-at", 25, nproc=2)
    assert r.returncode != 0 and seconds < 60
    assert ppdgm.fit.safe_load(out / "checkpoint.pt")["step"] == 20
    assert not (out / "fit.json").exists()
    r, _ = launch("train_dist.py", out, 40, 24, "--resume", nproc=2)
    assert r.returncode == 0, r.stderr[-2000:]
    resumed = ppdgm.load(out)
    r, _ = launch("train_dist.py", tmp_path / "whole", 40, 24, nproc=2)
    assert r.returncode == 0, r.stderr[-2000:]
    expected = ppdgm.load(tmp_path / "whole")
    assert len(resumed.history["loss"]) == 40
    for name, value in expected.params["params"].items():
        assert torch.allclose(value, resumed.params["params"][name], atol=1e-6), name


def test_nproc_must_fit_the_data():
    from ppdgm.distributed import check_nproc

    with pytest.raises(ValueError, match=">= 1"):
        check_nproc(0, 100, 10)
    with pytest.raises(ValueError, match="larger than the data's 4 minibatches"):
        check_nproc(5, 100, 25)
    check_nproc(4, 100, 25)
