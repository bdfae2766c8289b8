"""Draws streamed off the device in chunks (``Sampler.stream_draws``): the same draws as an
unstreamed run, a device buffer that never holds more than one chunk, chunk files read lazily,
saved, loaded, converted to ArviZ, and a killed run resumed."""

import pyro
import pyro.distributions as dist
import pytest
import torch

import ppdgm
from ppdgm.fit import LazyDraws
from ppdgm.inference.base import Checkpointer
from ppdgm.inference.chees import ChEES
from ppdgm.inference.mcmc import NUTS

from known_posteriors import X, normal_normal

CHAINS, DRAWS, CHUNK = 8, 23, 5  # 23 draws: four full chunks and a last one of 3


def regression(x, y):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal((x * w).sum(-1), sigma), obs=y)


g = torch.Generator().manual_seed(0)
XR = torch.randn(40, 3, generator=g)
YR = XR @ torch.tensor([1.0, -0.5, 0.2]) + 0.3 * torch.randn(40, generator=g)


def chees(**kw):
    return ChEES(num_chains=CHAINS, num_warmup=30, num_samples=DRAWS, seed=0, progress=False, **kw)


def assert_same_draws(a, b):
    assert set(a.samples) == set(b.samples)
    for k in a.samples:
        assert torch.equal(a.samples[k], b.samples[k]), k
    sa, sb = a.extra["tensors"]["sample_stats"], b.extra["tensors"]["sample_stats"]
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k].nan_to_num(), sb[k].nan_to_num()), k


@pytest.fixture(scope="module")
def unstreamed():
    return chees().run(regression, XR, YR)


@pytest.mark.parametrize("to", ["host", "disk"])
def test_streamed_draws_equal_the_unstreamed_run_and_the_buffer_holds_one_chunk(to, unstreamed, tmp_path):
    engine = chees().stream_draws(to, chunk_draws=CHUNK, directory=tmp_path / "draws" if to == "disk" else None)
    fit = engine.run(regression, XR, YR)
    assert_same_draws(fit, unstreamed)
    # one chunk of every value and statistic of every chain, never the whole run's
    per_draw = sum(v[:, 0].nbytes for v in unstreamed.samples.values()) + sum(
        v[:, 0].nbytes for v in unstreamed.extra["tensors"]["sample_stats"].values()
    )
    assert fit.extra["draws"]["peak_device_bytes"] == CHUNK * per_draw
    assert CHUNK * per_draw < DRAWS * per_draw / 4
    if to == "disk":
        assert isinstance(fit.samples, LazyDraws)
        assert len(list((tmp_path / "draws").glob("chunk-*.pt"))) == 5  # ceil(23 / 5)
        assert "LazyDraws(samples" in repr(fit.samples)


def test_disk_draws_save_load_and_convert_to_arviz(unstreamed, tmp_path):
    fit = chees().stream_draws("disk", chunk_draws=CHUNK, directory=tmp_path / "run").run(regression, XR, YR)
    fit.save(tmp_path / "fit")
    loaded = ppdgm.load(tmp_path / "fit", model=regression)
    assert isinstance(loaded.samples, LazyDraws)
    assert_same_draws(loaded, unstreamed)
    loaded.args = (XR, YR)
    idata, expect = loaded.to_arviz(), unstreamed.to_arviz()
    assert idata.posterior["w"].shape == (CHAINS, DRAWS, 3)
    assert (idata.posterior["w"].values == expect.posterior["w"].values).all()
    assert (idata.log_likelihood["y"].values == expect.log_likelihood["y"].values).all()
    assert idata.sample_stats["diverging"].shape == (CHAINS, DRAWS)


def test_nuts_chains_stream_one_at_a_time(tmp_path):
    def nuts():
        return NUTS(num_chains=2, num_warmup=20, num_samples=9, seed=0, progress=False)

    whole = nuts().run(normal_normal, X)
    fit = nuts().stream_draws("disk", chunk_draws=4, directory=tmp_path).run(normal_normal, X)
    assert_same_draws(fit, whole)
    per_draw = 4 + 4 * 5  # one chain's float32 mu and its five statistics (8-byte lp, step size, ...)
    assert fit.extra["draws"]["peak_device_bytes"] <= 4 * (per_draw + 4 * 4)
    assert len(list(tmp_path.glob("chunk-*.pt"))) == 6  # 2 chains x ceil(9 / 4)


@pytest.mark.parametrize("to", ["host", "disk"])
def test_killed_streamed_run_resumes_to_the_uninterrupted_draws(to, unstreamed, tmp_path, monkeypatch):
    save, saves = Checkpointer.save, []

    def killed(self, state):
        saves.append(1)
        if len(saves) == 6:  # at iteration 48 of 53: 18 draws, three chunks and 3 in the buffer
            raise KeyboardInterrupt
        save(self, state)

    def engine():
        directory = tmp_path / "draws" if to == "disk" else None
        return chees(checkpoint_every=8).stream_draws(to, chunk_draws=CHUNK, directory=directory)

    monkeypatch.setattr(Checkpointer, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        engine().run(regression, XR, YR, checkpoint_dir=tmp_path / "ckpt")
    monkeypatch.setattr(Checkpointer, "save", save)
    resumed = engine().run(regression, XR, YR, checkpoint_dir=tmp_path / "ckpt", resume=True)
    assert_same_draws(resumed, unstreamed)
    if to == "disk":  # a run keeping its draws on the device cannot take over chunk files
        with pytest.raises(ValueError, match="stream_draws"):
            chees(checkpoint_every=8).run(regression, XR, YR, checkpoint_dir=tmp_path / "ckpt", resume=True)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"to": "gpu"}, "to must be one of"),
        ({"to": "disk", "chunk_draws": 0}, "chunk_draws must be a positive int"),
        ({"to": "disk"}, "directory is required"),
        ({"to": "host", "directory": "x"}, "directory is only used"),
    ],
)
def test_bad_streaming_options_are_refused_by_name(kw, match):
    with pytest.raises(ValueError, match=match):
        chees().stream_draws(**kw)


def test_unwritable_directory_is_refused_before_sampling(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is an existing file"):
        chees().stream_draws("disk", directory=tmp_path / "file")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draws_stream_to_pinned_host_memory(unstreamed):
    fit = chees(device="cuda").stream_draws("host", chunk_draws=CHUNK).run(regression, XR.cuda(), YR.cuda())
    assert all(v.device.type == "cpu" and v.is_pinned() for v in fit.samples.values())
    assert torch.allclose(fit.samples["w"].mean((0, 1)), unstreamed.samples["w"].mean((0, 1)), atol=0.3)
