import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

from ppdgm.inference import SVI, NonFiniteLossError

N, D, NOISE, PRIOR = 500, 3, 0.5, 1.0


def regression_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=g)
    y = X @ torch.tensor([1.0, -2.0, 0.5]) + NOISE * torch.randn(N, generator=g)
    return X, y


def linear_regression(X, y=None):
    """Bayesian linear regression as written from Pyro's tutorials (plain function)."""
    w = pyro.sample("w", dist.Normal(torch.zeros(D), PRIOR).to_event(1))
    with pyro.plate("data", X.shape[0]):
        return pyro.sample("y", dist.Normal((X * w).sum(-1), NOISE), obs=y)


def analytic_posterior(X, y):
    precision = X.T @ X / NOISE**2 + torch.eye(D) / PRIOR**2
    cov = torch.linalg.inv(precision)
    return cov @ X.T @ y / NOISE**2, cov.diag().sqrt()


def test_minibatch_svi_matches_the_conjugate_posterior():
    X, y = regression_data()
    mean, sd = analytic_posterior(X, y)
    guide = AutoMultivariateNormal(linear_regression, init_scale=0.05)
    engine = SVI(
        num_steps=1000,
        batch_size=50,
        lr=0.05,
        lr_schedule="exponential",
        lr_final_factor=0.01,
        num_particles=8,
        vectorize_particles=True,
        max_plate_nesting=1,
        progress=False,
    )
    fit = engine.run(linear_regression, guide, (X, y))
    post = guide.get_posterior()
    # without the N/batch scaling the sd would come out sqrt(50/500) = 0.32 times too small
    assert ((post.mean.detach() - mean).abs() / sd).max() < 0.25
    ratio = post.covariance_matrix.diag().sqrt().detach() / sd
    assert ((ratio - 1).abs() < 0.15).all(), ratio
    assert len(fit.history["loss"]) == 1000 and fit.timing["ms_per_step"] > 0


def test_default_guide_is_autonormal_and_same_seed_same_result():
    X, y = regression_data()
    fits = [SVI(num_steps=50, lr=0.05, progress=False, seed=3).run(linear_regression, None, (X, y)) for _ in range(2)]
    assert fits[0].extra["autoguide"] == "AutoNormal"
    assert fits[0].history["loss"] == fits[1].history["loss"]
    a, b = (f.params["params"]["AutoNormal.locs.w"] for f in fits)
    assert torch.equal(a, b)
    other = SVI(num_steps=50, lr=0.05, progress=False, seed=4).run(linear_regression, None, (X, y))
    assert other.history["loss"] != fits[0].history["loss"]


def test_iwae_bound_is_tighter_than_the_elbo_on_a_fixed_guide():
    X, y = regression_data()
    guide = AutoNormal(linear_regression, init_scale=0.05)
    SVI(num_steps=300, lr=0.05, progress=False).run(linear_regression, guide, (X[:50], y[:50]))
    elbo = pyro.infer.Trace_ELBO(num_particles=2000, vectorize_particles=True, max_plate_nesting=1)
    iwae = pyro.infer.RenyiELBO(alpha=0, num_particles=50, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad():
        neg_elbo = elbo.loss(linear_regression, guide, X[:50], y[:50])
        neg_iwae = sum(iwae.loss(linear_regression, guide, X[:50], y[:50]) for _ in range(20)) / 20
    assert neg_iwae < neg_elbo
    fit = SVI(
        loss="iwae",
        num_particles=10,
        num_steps=20,
        lr=0.01,
        max_plate_nesting=1,
        vectorize_particles=True,
        progress=False,
    ).run(linear_regression, guide, (X[:50], y[:50]))
    assert all(math.isfinite(v) for v in fit.history["loss"])


def test_enum_loss_marginalizes_a_discrete_latent():
    data = torch.cat([torch.randn(100) - 3, torch.randn(100) + 3])

    def mixture(x):
        locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(locs[z], 1.0), obs=x)

    def guide(x):
        pass

    SVI(loss="enum", num_steps=300, lr=0.05, max_plate_nesting=1, progress=False).run(mixture, guide, data)
    locs = pyro.param("locs").detach().sort().values
    assert torch.allclose(locs, torch.tensor([-3.0, 3.0]), atol=0.3)


def test_non_finite_loss_stops_with_the_step_and_keeps_finite_params(tmp_path):
    def runaway():
        # Adam with a constant gradient moves c by exactly lr per step: c = step, and the
        # log-density becomes -inf once c > 3.5, i.e. at step 4
        c = pyro.param("c", torch.tensor(0.0))
        pyro.factor("f", c + torch.where(c > 3.5, -math.inf, 0.0))

    seen = []
    with pytest.raises(NonFiniteLossError, match="at step 4") as err:
        SVI(num_steps=100, lr=1.0, progress=False).run(
            runaway, checkpoint_dir=tmp_path, callbacks=[lambda step, info: seen.append(step)]
        )
    fit = err.value.fit
    assert seen == [1, 2, 3, 4] and len(fit.history["loss"]) == 4
    assert fit.param("c").item() == pytest.approx(4.0)  # the last finite parameters, not NaN
    assert (tmp_path / "fit.json").exists()


def test_early_stopping_keeps_the_best_validation_parameters():
    X, y = regression_data()
    fit = SVI(num_steps=2000, lr=0.05, eval_every=10, patience=3, progress=False).run(
        linear_regression, None, (X[:400], y[:400]), val_data=(X[400:], y[400:])
    )
    assert len(fit.history["loss"]) < 2000  # stopped early
    best = fit.extra["best_val"]
    assert best["loss"] == min(fit.history["val_loss"])
    assert fit.history["val_step"][-1] - best["step"] == 30


def test_guide_mismatch_and_missing_data_plate_fail_before_training():
    X, y = regression_data()

    def wrong_guide(X, y):
        pyro.sample("v", dist.Normal(torch.zeros(D), 1.0).to_event(1))

    with pytest.raises(ValueError, match=r"model latents without a guide site \['w'\].*absent from the model \['v'\]"):
        SVI(num_steps=5, progress=False).run(linear_regression, wrong_guide, (X, y))

    def unnamed_plate(X, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(D), 1.0).to_event(1))
        with pyro.plate("obs", X.shape[0]):
            pyro.sample("y", dist.Normal((X * w).sum(-1), 1.0), obs=y)

    with pytest.raises(ValueError, match="plate over data points to be named 'data'"):
        SVI(num_steps=5, batch_size=10, progress=False).run(unnamed_plate, None, (X, y))
    SVI(num_steps=5, batch_size=10, data_plate="obs", progress=False).run(unnamed_plate, None, (X, y))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"loss": "elbow"}, "loss must be one of"),
        ({"num_steps": 0}, "num_steps"),
        ({"lr": -1}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"optim": "sgdx"}, "optim"),
        ({"lr_schedule": "step"}, "lr_schedule"),
    ],
)
def test_bad_engine_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SVI(**kwargs)


def test_bad_data_is_refused_before_compute():
    X, y = regression_data()
    with pytest.raises(ValueError, match="first"):
        SVI(num_steps=1, progress=False).run(linear_regression, None, (X, y[:10]))
    y_nan = y.clone()
    y_nan[3] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        SVI(num_steps=1, progress=False).run(linear_regression, None, (X, y_nan))


def test_torch_dataset_minibatches():
    X, y = regression_data()
    ds = torch.utils.data.TensorDataset(X, y)
    fit = SVI(num_epochs=2, batch_size=100, lr=0.05, progress=False).run(linear_regression, None, ds)
    assert len(fit.history["loss"]) == 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_svi_on_cuda():
    X, y = regression_data()
    fit = SVI(num_steps=200, lr=0.05, batch_size=100, device="cuda", progress=False).run(
        linear_regression, None, (X, y)
    )
    assert fit.params["params"]["AutoNormal.locs.w"].device.type == "cuda"
    assert torch.allclose(fit.params["params"]["AutoNormal.locs.w"].cpu(), torch.tensor([1.0, -2.0, 0.5]), atol=0.2)


def test_maximum_likelihood_fast_path_equals_the_elbo_of_an_empty_guide():
    from ppdgm.inference.svi import MaximumLikelihood, ScaleDataPlate, empty_guide

    X, y = regression_data()

    def mle_model(X, y):
        w = pyro.param("w", torch.tensor([0.5, -1.0, 0.0]))
        pyro.factor("penalty", -0.1 * (w**2).sum())
        with pyro.plate("data", X.shape[0]):
            pyro.sample("y", dist.Normal((X * w).sum(-1), NOISE), obs=y)

    scaled = ScaleDataPlate("data", 10.0)
    for model in (mle_model, scaled(mle_model)):
        expected = pyro.infer.Trace_ELBO().loss(model, empty_guide, X[:50], y[:50])
        assert MaximumLikelihood.loss(model, empty_guide, X[:50], y[:50]) == pytest.approx(expected, rel=1e-6)

    # the training step: the same loss and gradient as Trace_ELBO on the plate-scaled model,
    # with the factor outside the data plate left unscaled
    pyro.clear_param_store()
    expected = pyro.infer.Trace_ELBO().loss_and_grads(scaled(mle_model), empty_guide, X[:50], y[:50])
    w = pyro.param("w").unconstrained()
    expected_grad, w.grad = w.grad.clone(), None
    loss, params = MaximumLikelihood.loss_and_params(mle_model, "data", 10.0, X[:50], y[:50])
    assert loss == pytest.approx(expected, rel=1e-6)
    assert len(params) == 1 and params[0] is w and torch.allclose(w.grad, expected_grad)

    def latent_model(X, y):
        pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="'z' is latent"):
        MaximumLikelihood.loss_and_params(latent_model, "data", None, X, y)
    fit = SVI(num_steps=300, lr=0.05, batch_size=100, progress=False).run(mle_model, None, (X, y))
    w_hat = fit.param("w")
    ridge = torch.linalg.solve(X.T @ X / NOISE**2 + 0.2 * torch.eye(D), X.T @ y / NOISE**2)
    assert torch.allclose(w_hat, ridge, atol=0.05)
