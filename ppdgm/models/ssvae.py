"""The semi-supervised VAE "M2" (Kingma, Rezende, Mohamed & Welling 2014) as one Pyro program.

The joint p(x, y, z) = p(z) p(y) p(x | y, z) has the label ``y`` as a discrete latent. Labels come
with the data as integers, ``-1`` where missing: a labelled point observes ``y`` (site
``y_observed``), an unlabelled one has it as a latent (site ``y_unobserved``) that the guide's
classifier q(y | x) proposes and ``TraceEnum_ELBO`` sums out exactly (train with
``SVI(loss="enum", max_plate_nesting=1)``). One minibatch may mix both kinds: each site is masked
to its points. Following the paper, the classifier also gets a direct likelihood term
``alpha * log q(y | x)`` on the labelled points (a ``pyro.factor`` in the model), since the ELBO
alone never trains q(y | x) on them. ``classify(x)`` returns P(y | x).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule
from torch.nn.functional import log_softmax, one_hot, softplus

from ppdgm.data import check_data
from ppdgm.evaluate import iwae_log_likelihood
from ppdgm.models.spec import ConstructorSpec
from ppdgm.models.vae import LIKELIHOODS, _choice, _positive_int
from ppdgm.nn import MLP, concat, make_activation


class SemiSupervisedVAE(ConstructorSpec, PyroModule):
    """M2: a VAE with a partly observed class label.

    Args:
        features, classes, latent_features, hidden_features, activation, likelihood: as for
            :class:`~ppdgm.models.vae.VAE`.
        alpha: weight of the labelled points' classification term ``alpha * log q(y | x)`` per
            point (Kingma et al. use 0.1 N).
        labelled_fraction: ``data_args(dataset)`` keeps this fraction of the labels (a seeded
            choice, ``label_seed``) and hides the rest as ``-1``, so ``ppdgm fit ssvae`` runs the
            semi-supervised setting from a fully labelled dataset.
    """

    datasets = ("digits-binary", "digits")

    default_engine = "svi"
    engine_config: ClassVar[dict] = {"loss": "enum", "max_plate_nesting": 1}
    support = "binary"
    likelihood_method = "iwae"

    def __init__(
        self,
        features: int = 64,
        classes: int = 10,
        latent_features: int = 16,
        hidden_features=(256,),
        activation: str = "softplus",
        likelihood: str = "bernoulli",
        alpha: float = 100.0,
        labelled_fraction: float = 0.1,
        label_seed: int = 0,
    ):
        super().__init__()
        _positive_int("features", features)
        _positive_int("classes", classes, 2)
        _positive_int("latent_features", latent_features)
        hidden_features = list(hidden_features) if isinstance(hidden_features, (list, tuple)) else hidden_features
        if (
            not isinstance(hidden_features, list)
            or not hidden_features
            or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden_features)
        ):
            raise ValueError(f"hidden_features must be a non-empty list of positive ints, got {hidden_features!r}")
        _choice("likelihood", likelihood, LIKELIHOODS)
        make_activation(activation)
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha >= 0:
            raise ValueError(f"alpha must be a non-negative number, got {alpha!r}")
        if not isinstance(labelled_fraction, (int, float)) or not 0 < labelled_fraction <= 1:
            raise ValueError(f"labelled_fraction must be in (0, 1], got {labelled_fraction!r}")
        self.features, self.classes, self.latent_features, self.hidden_features = (
            features,
            classes,
            latent_features,
            hidden_features,
        )
        self.activation, self.likelihood, self.alpha = activation, likelihood, float(alpha)
        self.labelled_fraction, self.label_seed = float(labelled_fraction), label_seed
        self.support = LIKELIHOODS[likelihood]
        self.classifier = MLP(features, hidden_features, classes, activation)
        self.encoder_z = MLP(features + classes, hidden_features, 2 * latent_features, activation)
        self.decoder = MLP(latent_features + classes, hidden_features[::-1], features, activation)
        self.x_log_scale = torch.nn.Parameter(torch.zeros(features)) if likelihood == "gaussian" else None

    @classmethod
    def from_data(cls, data, **kwargs):
        if data.y is not None:
            kwargs.setdefault("classes", int(data.y.max()) + 1)
        return cls(features=data.x.shape[1], **kwargs)

    def data_args(self, dataset) -> tuple:
        """``(x, y)`` with all but ``labelled_fraction`` of the labels hidden as ``-1``."""
        x = check_data(dataset.x, "x", support=self.support, rank=2)
        return x, self.hide_labels(dataset.y, x.shape[0])

    def hide_labels(self, y, n: int) -> torch.Tensor:
        """Keep ``round(labelled_fraction * n)`` labels (seeded choice), set the rest to -1."""
        if y is None:
            return torch.full((n,), -1, dtype=torch.long)
        y = self._check_y(y, n).clone()
        keep = max(1, round(self.labelled_fraction * n))
        # numpy's stream, so the choice is independent of torch-seeded minibatch orders
        order = torch.from_numpy(np.random.default_rng(self.label_seed).permutation(n))
        y[order[keep:].to(y.device)] = -1
        return y

    def _check_y(self, y, n):
        y = torch.as_tensor(y)
        if y.is_floating_point() or y.dim() != 1 or y.shape[0] != n:
            raise ValueError(
                f"y: expected {n} integer labels (-1 where missing), got dtype {y.dtype} and shape {tuple(y.shape)}"
            )
        if y.numel() and (y.min() < -1 or y.max() >= self.classes):
            raise ValueError(
                f"y: expected labels in [0, {self.classes}) or -1 for missing, got range [{y.min()}, {y.max()}]"
            )
        return y.long()

    def _check_x(self, x):
        x = check_data(x, "x", support=self.support, rank=2)
        if x.shape[1] != self.features:
            raise ValueError(f"x: expected {self.features} columns, got shape {tuple(x.shape)}")
        return x.to(self._decoder_weight.device)

    @property
    def _decoder_weight(self) -> torch.Tensor:
        """The decoder's first weight, whose device and dtype are the model's."""
        first = self.decoder[0]
        assert isinstance(first, torch.nn.Linear)  # an MLP starts with a Linear
        return first.weight

    # -- distributions ----------------------------------------------------------------------
    def _onehot(self, y):
        return one_hot(y, self.classes).to(self._decoder_weight)

    def likelihood_dist(self, z, y):
        out = self.decoder(concat(z, self._onehot(y)))
        if self.likelihood == "bernoulli":
            return dist.Bernoulli(logits=out, validate_args=False).to_event(1)
        if self.likelihood == "continuous_bernoulli":
            return dist.ContinuousBernoulli(logits=out).to_event(1)
        assert self.x_log_scale is not None  # a gaussian likelihood has a scale
        return dist.Normal(out, self.x_log_scale.exp()).to_event(1)

    def _labels(self, x, y, n):
        if y is None:
            return torch.full((n,), -1, dtype=torch.long, device=self._decoder_weight.device)
        return self._check_y(y, n).to(self._decoder_weight.device)

    # -- Pyro programs ------------------------------------------------------------------------
    def model(self, x=None, y=None, n: int | None = None):
        pyro.module("ssvae", self)
        if x is not None:
            x = self._check_x(x)
        n = x.shape[0] if x is not None else (len(y) if y is not None else n)
        if n is None:
            raise ValueError("model needs data x, labels y or a number of points n")
        y = self._labels(x, y, n)
        labelled = y >= 0
        w = self._decoder_weight
        prior_y = w.new_zeros(self.classes)
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(w.new_zeros(self.latent_features), 1.0).to_event(1))
            y_full = self._label_sites(prior_y, y, labelled, in_model=True)
            xs = pyro.sample("x", self.likelihood_dist(z, y_full), obs=x)
            if x is not None and self.alpha > 0 and labelled.any():
                log_q = log_softmax(self.classifier(x), -1).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                pyro.factor("classifier", self.alpha * torch.where(labelled, log_q, torch.zeros_like(log_q)))
        return xs

    def guide(self, x=None, y=None, n: int | None = None):
        pyro.module("ssvae", self)
        if x is None:  # generating: the model's prior is the proposal
            return None
        x = self._check_x(x)
        y = self._labels(x, y, x.shape[0])
        labelled = y >= 0
        with pyro.plate("data", x.shape[0]):
            y_full = self._label_sites(self.classifier(x), y, labelled, in_model=False)
            loc, raw = self.encoder_z(concat(x, self._onehot(y_full))).chunk(2, dim=-1)
            pyro.sample("z", dist.Normal(loc, softplus(raw) + 1e-4).to_event(1))

    def _label_sites(self, logits, y, labelled, in_model: bool):
        """Observe ``y`` where known (model only), treat it as an enumerated latent where missing."""
        known = y.clamp(min=0)
        if in_model and labelled.any():
            with poutine.mask(mask=labelled):
                pyro.sample("y_observed", dist.Categorical(logits=logits), obs=known)
        if labelled.all():
            return known
        with poutine.mask(mask=~labelled):
            missing = pyro.sample("y_unobserved", dist.Categorical(logits=logits), infer={"enumerate": "parallel"})
        return torch.where(labelled, known, missing)

    # -- use ----------------------------------------------------------------------------------
    @torch.no_grad()
    def classify(self, x) -> torch.Tensor:
        """P(y | x) from the classifier q(y | x), ``(n, classes)``."""
        return self.classifier(self._check_x(x)).softmax(-1)

    def accuracy(self, x, y) -> float:
        """Fraction of rows of ``x`` whose most probable class is ``y``."""
        x = self._check_x(x)
        y = self._check_y(y, x.shape[0]).to(x.device)
        return (self.classify(x).argmax(-1) == y).float().mean().item()

    @torch.no_grad()
    def sample(self, n: int, y=None, mean: bool = False) -> torch.Tensor:
        """``n`` draws of x; ``y`` fixes the classes (an int or ``n`` labels), else y ~ p(y)."""
        _positive_int("n", n)
        w = self._decoder_weight
        if y is None:
            y = torch.randint(self.classes, (n,), device=w.device)
        y = torch.as_tensor(y, device=w.device)
        y = self._check_y(y.expand(n) if y.dim() == 0 else y, n)
        if (y < 0).any():
            raise ValueError("y: sample needs known labels, got -1")
        z = torch.randn(n, self.latent_features, device=w.device)
        d = self.likelihood_dist(z, y)
        return (d.base_dist.mean if self.likelihood != "gaussian" else d.base_dist.loc) if mean else d.sample()

    def log_likelihood(self, x, k: int = 1000, batch_size: int = 100) -> torch.Tensor:
        """Per-point log p(x) in nats (label summed out), by importance sampling with ``k`` draws
        of (y, z) from the guide."""
        return iwae_log_likelihood(self.model, self.guide, self._check_x(x), k=k, batch_size=batch_size)
