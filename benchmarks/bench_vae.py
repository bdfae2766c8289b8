"""VAE training: a plain PyTorch loop and Pyro's tutorial loop vs ppdgm's SVI engine, and M2 vs
logistic regression.

Table 1: the architecture of Pyro's VAE tutorial (one hidden layer of 256 softplus units, a
16-d latent, Bernoulli decoder, Adam lr 1e-3, batch 100) on the binarized 8x8 digits, trained for
the same number of steps from the same seed

- by a plain PyTorch loop over the same networks computing the same single-sample ELBO
  (``log p(x|z) + log p(z) - log q(z|x)`` at one reparameterized draw, as ``Trace_ELBO``) with
  ``torch.distributions`` and ``torch.optim.Adam`` (the floor),
- by a hand-written ``pyro.infer.SVI`` loop over the tutorial's own model/guide (the peer),
- by ``ppdgm.inference.SVI`` on the very same model/guide functions (default ``compile="replay"``;
  ``compile="none"``, tracing every step with Pyro's ``Trace_ELBO`` as before the compiled ELBO;
  ``compile="jit"``), and
- by ``ppdgm.inference.SVI`` on the zoo's ``ppdgm.models.vae.VAE`` (same sizes).

The runs are interleaved in one process at one thread. It prints wall-clock ms/step (whole run,
set-up included; best of ``--repeats``), the ratio to the plain loop, the line
``ratio ppdgm SVI / plain PyTorch ms/step = <number>`` (the engine's default, ``compile="replay"``, on
the tutorial's model/guide; target <= 1.3) and each model's test NLL by importance sampling with k=1000.

Table 2: the semi-supervised M2 model with 120 labelled of the 1,200 training digits vs
scikit-learn's LogisticRegression on the same 120 labels, test accuracy, on binarized digits
(Bernoulli likelihood) and on grey digits (continuous Bernoulli).

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_vae.py`` (about 3 minutes on one CPU core).
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI as PyroSVI
from pyro.infer import Trace_ELBO
from pyro.optim import Adam
from sklearn.linear_model import LogisticRegression
from torch import nn

from ppdgm.data import load_digits
from ppdgm.evaluate import bernoulli_baseline, iwae_log_likelihood, summarize
from ppdgm.inference import SVI
from ppdgm.models.ssvae import SemiSupervisedVAE
from ppdgm.models.vae import VAE


# -- Pyro's VAE tutorial (https://pyro.ai/examples/vae.html), sized for 8x8 digits -------------
class Encoder(nn.Module):
    def __init__(self, z_dim, hidden_dim, x_dim):
        super().__init__()
        self.fc1 = nn.Linear(x_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, z_dim)
        self.fc22 = nn.Linear(hidden_dim, z_dim)
        self.softplus = nn.Softplus()

    def forward(self, x):
        hidden = self.softplus(self.fc1(x))
        return self.fc21(hidden), torch.exp(self.fc22(hidden))


class Decoder(nn.Module):
    def __init__(self, z_dim, hidden_dim, x_dim):
        super().__init__()
        self.fc1 = nn.Linear(z_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, x_dim)
        self.softplus = nn.Softplus()

    def forward(self, z):
        return torch.sigmoid(self.fc21(self.softplus(self.fc1(z))))


class TutorialVAE(nn.Module):
    def __init__(self, z_dim=16, hidden_dim=256, x_dim=64):
        super().__init__()
        self.encoder = Encoder(z_dim, hidden_dim, x_dim)
        self.decoder = Decoder(z_dim, hidden_dim, x_dim)
        self.z_dim = z_dim

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(torch.Size((x.shape[0], self.z_dim)))
            z_scale = x.new_ones(torch.Size((x.shape[0], self.z_dim)))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            loc_img = self.decoder(z)
            pyro.sample("obs", dist.Bernoulli(loc_img, validate_args=False).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            z_loc, z_scale = self.encoder(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))


def minibatches(x, steps, batch, seed):
    """The tutorial's order: reshuffled each epoch."""
    per_epoch = x.shape[0] // batch
    order = torch.arange(x.shape[0])
    for step in range(steps):
        epoch, pos = divmod(step, per_epoch)
        if pos == 0:
            order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        yield x[order[pos * batch : (pos + 1) * batch]]


def plain_pytorch_loop(vae, x, steps, batch, lr, seed):
    """The floor: the tutorial's networks and single-sample ELBO written directly in PyTorch."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    for b in minibatches(x, steps, batch, seed):
        z_loc, z_scale = vae.encoder(b)
        z = z_loc + z_scale * torch.randn_like(z_loc)
        log_q = torch.distributions.Normal(z_loc, z_scale).log_prob(z).sum()
        log_prior = torch.distributions.Normal(torch.zeros_like(z), torch.ones_like(z)).log_prob(z).sum()
        log_lik = torch.distributions.Bernoulli(vae.decoder(z), validate_args=False).log_prob(b).sum()
        loss = -(log_lik + log_prior - log_q)
        opt.zero_grad()
        loss.backward()
        opt.step()


def hand_written_loop(vae, x, steps, batch, lr, seed):
    """The tutorial's training loop: shuffle each epoch, ``svi.step`` per minibatch."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    svi = PyroSVI(vae.model, vae.guide, Adam({"lr": lr}), loss=Trace_ELBO())
    for b in minibatches(x, steps, batch, seed):
        svi.step(b)


def timed(fn):
    """CPU seconds of ``fn`` (one thread): steadier than wall time on a shared machine."""
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def test_nll(model, guide, x, seed):
    torch.manual_seed(seed)
    return summarize(iwae_log_likelihood(model, guide, x, k=1000), "iwae-k1000")


def vae_table(steps, repeats, seed):
    train, test = load_digits("train", binarize=True), load_digits("test", binarize=True)
    x, lr, batch = train.x, 1e-3, 100

    def engine(compile):
        def fit(vae):
            engine = SVI(num_steps=steps, batch_size=batch, lr=lr, seed=seed, progress=False, compile=compile)
            engine.run(vae.model, vae.guide, x)

        return fit

    tutorial = "Pyro tutorial VAE, "
    runs = {  # name: (network, training)
        tutorial + "plain PyTorch loop": (
            TutorialVAE,
            partial(plain_pytorch_loop, x=x, steps=steps, batch=batch, lr=lr, seed=seed),
        ),
        tutorial + "hand-written pyro.infer.SVI loop": (
            TutorialVAE,
            partial(hand_written_loop, x=x, steps=steps, batch=batch, lr=lr, seed=seed),
        ),
        tutorial + "ppdgm SVI engine": (TutorialVAE, engine("replay")),
        tutorial + 'ppdgm SVI engine, compile="none" (traced)': (TutorialVAE, engine("none")),
        tutorial + 'ppdgm SVI engine, compile="jit"': (TutorialVAE, engine("jit")),
        "ppdgm.models.vae.VAE (64-256-16), ppdgm SVI engine": (
            partial(VAE, features=64, latent_features=16, hidden_features=[256]),
            engine("replay"),
        ),
    }
    rows: dict[str, list] = {}
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # torch's first optimizer imports dynamo (seconds)
    for _rep in range(repeats):
        for name, (network, training) in runs.items():
            torch.manual_seed(seed)
            vae = network()
            rows.setdefault(name, []).append((timed(partial(training, vae)), vae.model, vae.guide))

    base_ms = None
    engine_ms = 1e3 * min(t for t, _, _ in rows[tutorial + "ppdgm SVI engine"]) / steps
    lines = [
        f"| {steps} steps, batch {batch}, Adam lr {lr} | CPU ms/step | ratio | test NLL (nats, k=1000) |",
        "|---|---:|---:|---:|",
    ]
    for name, runs in rows.items():
        ms = 1e3 * min(t for t, _, _ in runs) / steps
        base_ms = base_ms or ms
        _, model, guide = runs[-1]
        nll = test_nll(model, guide, test.x, seed)
        lines.append(f"| {name} | {ms:.2f} | {ms / base_ms:.2f}x | {nll.nll:.2f} +/- {nll.stderr:.2f} |")
    base = bernoulli_baseline(train.x, test.x)
    lines.append(f"| factorized Bernoulli baseline | | | {base.nll:.2f} +/- {base.stderr:.2f} |")
    lines.append(f"\nratio ppdgm SVI / plain PyTorch ms/step = {engine_ms / base_ms:.3f}")
    return "\n".join(lines)


def m2_table(steps, seed):
    lines = [
        "| digits (120 of 1,200 labelled) | M2 test accuracy | LogisticRegression (same 120 labels) | M2 ms/step |",
        "|---|---:|---:|---:|",
    ]
    for binarize, likelihood in ((True, "bernoulli"), (False, "continuous_bernoulli")):
        train, test = load_digits("train", binarize=binarize), load_digits("test", binarize=binarize)
        torch.manual_seed(seed)
        m = SemiSupervisedVAE.from_data(train, likelihood=likelihood)
        x, y = m.data_args(train)
        fit = SVI(
            loss="enum", max_plate_nesting=1, num_steps=steps, batch_size=100, lr=3e-3, seed=seed, progress=False
        ).run(m.model, m.guide, (x, y))
        known = y >= 0
        logreg = LogisticRegression(max_iter=5000).fit(x[known].numpy(), y[known].numpy())
        lr_acc = (logreg.predict(test.x.numpy()) == test.y.numpy()).mean()
        kind = "binarized, Bernoulli" if binarize else "grey, continuous Bernoulli"
        lines.append(f"| {kind} | {m.accuracy(test.x, test.y):.3f} | {lr_acc:.3f} | {fit.timing['ms_per_step']:.1f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--m2-steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-m2", action="store_true", help="only the timing table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, {torch.get_num_threads()} thread(s)\n")
    print(vae_table(args.steps, args.repeats, args.seed))
    if not args.skip_m2:
        print()
        print(m2_table(args.m2_steps, args.seed))


if __name__ == "__main__":
    main()
