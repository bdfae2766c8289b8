"""The compiled ELBO equals Trace_ELBO: same draws, same loss, same gradient on every param."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from torch import nn

from ppdgm.inference import SVI
from ppdgm.inference.compiled_elbo import CompiledELBO, JitELBO, ScaleDataPlate
from ppdgm.inference.param_optim import StoreAdam


class TinyVAE(nn.Module):
    """Pyro's tutorial VAE at 8-16-2: Normal latent per point, Bernoulli pixels."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(8, 16), nn.Softplus(), nn.Linear(16, 4))
        self.dec = nn.Sequential(nn.Linear(2, 16), nn.Softplus(), nn.Linear(16, 8))

    def model(self, x):
        pyro.module("dec", self.dec)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.dec(z), validate_args=False).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("enc", self.enc)
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = self.enc(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def regression(x, y):
    """Global latents, a nested plate, a subsampled plate and a scaled site (AutoNormal guide)."""
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    with pyro.plate("groups", 2, dim=-2):
        offset = pyro.sample("offset", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0], subsample_size=6, dim=-1) as idx, poutine.scale(scale=0.5):
            pyro.sample("y", dist.Normal(x[idx] @ w + offset, sigma), obs=y[:, idx])


def grads(params) -> dict:
    store = pyro.get_param_store()
    out = {store.param_name(p): p.grad.clone() for p in params}
    for p in params:
        p.grad = None
    return out


def traced(model, guide, scale, args, num_particles=1):
    """Pyro's own Trace_ELBO step, as the engine ran it before the compiled ELBO."""
    if scale is not None:
        model, guide = ScaleDataPlate("data", scale)(model), ScaleDataPlate("data", scale)(guide)
    with poutine.trace(param_only=True) as cap:
        loss = Trace_ELBO(num_particles=num_particles).loss_and_grads(model, guide, *args)
    return loss, grads([s["value"].unconstrained() for s in cap.trace.nodes.values()])


def programs():
    torch.manual_seed(0)
    vae = TinyVAE()
    x = torch.bernoulli(torch.full((10, 8), 0.3))
    xr, yr = torch.randn(20, 3), torch.randn(2, 20)
    return {
        "vae": (vae.model, vae.guide, 4.0, (x,)),
        "plates+subsample+scale": (regression, AutoNormal(regression), None, (xr, yr)),
    }


@pytest.mark.parametrize(
    "name,kind,num_particles",
    [
        ("vae", CompiledELBO, 1),
        ("plates+subsample+scale", CompiledELBO, 1),
        ("plates+subsample+scale", CompiledELBO, 3),
        ("vae", JitELBO, 1),
        ("plates+subsample+scale", JitELBO, 1),
    ],
)
def test_compiled_loss_and_gradients_equal_trace_elbo(name, kind, num_particles):
    pyro.clear_param_store()
    model, guide, scale, args = programs()[name]
    compiled = kind(Trace_ELBO(num_particles=num_particles), "data")
    for _ in range(2):  # the first step records the program, then replays it
        grads(compiled.loss_and_params(model, guide, scale, args, {})[1])
    if kind is CompiledELBO:
        assert compiled.recorded == 1 and compiled.replayed == 2 and compiled.changes == compiled.traced == 0
    for seed in range(3):
        pyro.set_rng_seed(seed)
        loss, params = compiled.loss_and_params(model, guide, scale, args, {})
        fast = grads(params)
        pyro.set_rng_seed(seed)
        ref_loss, ref = traced(model, guide, scale, args, num_particles)
        assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-4)
        assert fast.keys() == ref.keys() and len(ref) > 0
        for k in ref:
            torch.testing.assert_close(fast[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)
        assert any(g.abs().sum() > 0 for g in ref.values())


def test_non_reparameterized_guide_site_is_traced_by_trace_elbo():
    def model(x):
        p = pyro.sample("p", dist.Beta(2.0, 2.0))
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(p))
            pyro.sample("x", dist.Normal(c, 1.0), obs=x)

    def guide(x):
        a = pyro.param("a", torch.tensor(2.0), constraint=dist.constraints.positive)
        pyro.sample("p", dist.Beta(a, 2.0))
        q = pyro.param("q", torch.full((x.shape[0],), 0.5), constraint=dist.constraints.unit_interval)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Bernoulli(q))  # no rsample: needs the score-function surrogate

    pyro.clear_param_store()
    x = torch.randn(5)
    compiled = CompiledELBO(Trace_ELBO(), "data")
    for seed in range(3):
        pyro.set_rng_seed(seed)
        loss, params = compiled.loss_and_params(model, guide, 2.0, (x,), {})
        fast = grads(params)
        pyro.set_rng_seed(seed)
        ref_loss, ref = traced(model, guide, 2.0, (x,))
        assert loss == pytest.approx(ref_loss)
        for k in ref:
            torch.testing.assert_close(fast[k], ref[k])
    assert compiled.replayed == 0 and compiled.traced == 3 and compiled.recorded == 1 and not compiled.enabled


def changing_model(x):
    """As many latent sites as the batch's first value says: the structure changes per step."""
    k = 1 + int(x[0] > 2.0)
    mus = [pyro.sample(f"mu_{i}", dist.Normal(0.0, 1.0)) for i in range(k)]
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(mus[0], 1.0), obs=x)


def changing_guide(x):
    for i in range(1 + int(x[0] > 2.0)):
        loc = pyro.param(f"loc_{i}", torch.tensor(0.0))
        scale = pyro.param(f"scale_{i}", torch.tensor(1.0), constraint=dist.constraints.positive)
        pyro.sample(f"mu_{i}", dist.Normal(loc, scale))


def test_structure_change_falls_back_to_tracing_and_still_trains():
    torch.manual_seed(1)
    data = 2.0 + torch.randn(200)
    exact_mean = float(data.sum() / (len(data) + 1))  # N(0, 1) prior, unit-variance likelihood
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    compiled, optim = CompiledELBO(Trace_ELBO(), "data"), StoreAdam(0.1)
    for step in range(250):
        batch = data[torch.randperm(200, generator=torch.Generator().manual_seed(step))[:40]]
        _, params = compiled.loss_and_params(changing_model, changing_guide, 5.0, (batch,), {})
        optim(params)
    assert compiled.changes >= 1 and compiled.recorded > 1 and compiled.replayed > 0
    assert abs(pyro.param("loc_0").item() - exact_mean) < 0.15
    assert abs(pyro.param("loc_1").item()) < 0.75  # near the prior mean 0 (data sit at 2): no data touch mu_1
    # the engine runs the same model with its compiled ELBO and reaches the same answer
    SVI(num_steps=250, batch_size=40, lr=0.1, progress=False).run(changing_model, changing_guide, data)
    assert abs(pyro.param("loc_0").item() - exact_mean) < 0.15


def test_engine_trajectory_equals_traced_engine():
    x = torch.bernoulli(torch.full((40, 8), 0.3), generator=torch.Generator().manual_seed(0))
    finals, losses = {}, {}
    for mode in ("none", "replay", "jit"):
        torch.manual_seed(0)
        vae = TinyVAE()
        fit = SVI(num_steps=40, batch_size=10, lr=0.01, seed=0, progress=False, compile=mode).run(
            vae.model, vae.guide, x
        )
        finals[mode], losses[mode] = pyro.get_param_store().get_state()["params"], fit.history["loss"]
    # the replay draws what Trace_ELBO draws: the same trajectory
    assert finals["none"].keys() == finals["replay"].keys()
    for k, v in finals["none"].items():
        torch.testing.assert_close(finals["replay"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    # jit's compilation runs the program twice (drawing), so its trajectory is another one
    first, last = sum(losses["jit"][:10]) / 10, sum(losses["jit"][-10:]) / 10
    assert last < first and finals["jit"].keys() == finals["none"].keys()


def test_jit_falls_back_to_the_replay_when_torch_jit_refuses_the_program():
    from ppdgm.models.ppca import PPCA  # its PyroParam reaches the jit graph as a constant

    pyro.clear_param_store()
    ppca = PPCA(features=4, latent_features=2)
    x = torch.randn(10, 4)
    compiled = JitELBO(Trace_ELBO(), "data")
    with pytest.warns(UserWarning, match="torch.jit.trace refused the program"):
        grads(compiled.loss_and_params(ppca.model, ppca.guide, 3.0, (x,), {})[1])
    grads(compiled.loss_and_params(ppca.model, ppca.guide, 3.0, (x,), {})[1])
    assert compiled.fallback is not None and compiled.fallback.replayed == 2
    pyro.set_rng_seed(0)
    loss, params = compiled.loss_and_params(ppca.model, ppca.guide, 3.0, (x,), {})
    fast = grads(params)
    pyro.set_rng_seed(0)
    ref_loss, ref = traced(ppca.model, ppca.guide, 3.0, (x,))
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for k in ref:
        torch.testing.assert_close(fast[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)


def test_compile_is_checked():
    with pytest.raises(ValueError, match="compile must be one of"):
        SVI(compile="fast")
    with pytest.raises(ValueError, match="elbo: expected a Trace_ELBO"):
        CompiledELBO(Trace_ELBO(num_particles=2, vectorize_particles=True), "data")
