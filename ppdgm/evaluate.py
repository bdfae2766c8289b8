"""Held-out log-likelihood in nats, so every family lands in one table.

``log_likelihood(model, x)`` asks the model for per-point log p(x) (each zoo class implements
``log_likelihood(x, **kw)`` with its own exact or estimated method) and returns the mean, its
standard error and the method used. The factorized-Bernoulli baseline is the number every model
of binary digits must beat.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ppdgm.data import check_data
from ppdgm.progress import progress_bar


@dataclass(frozen=True)
class NatsEstimate:
    """Mean log-likelihood per data point in nats with its standard error."""

    mean: float
    stderr: float
    n: int
    method: str

    @property
    def nll(self) -> float:
        return -self.mean

    def __str__(self) -> str:
        return f"{self.method}: log p(x) = {self.mean:.3f} +/- {self.stderr:.3f} nats (NLL {self.nll:.3f}, n={self.n})"


def summarize(per_point: torch.Tensor, method: str) -> NatsEstimate:
    per_point = per_point.detach().double().flatten()
    n = per_point.numel()
    sd = per_point.std().item() if n > 1 else float("nan")
    return NatsEstimate(per_point.mean().item(), sd / math.sqrt(n), n, method)


def log_likelihood(model, x, method: str | None = None, **kwargs) -> NatsEstimate:
    """Mean held-out log p(x) in nats of a zoo model, by the model's own (or the named) method."""
    if not hasattr(model, "log_likelihood"):
        raise TypeError(f"{type(model).__name__} has no log_likelihood(x); cannot evaluate it in nats")
    if method is not None:
        kwargs["method"] = method
    ll = model.log_likelihood(x, **kwargs)
    label: str = method or str(getattr(model, "likelihood_method", type(model).__name__))
    options = {k: v for k, v in kwargs.items() if k != "method" and isinstance(v, (int, float, str, bool))}
    if options:  # e.g. k=10 overrides the default number of importance samples in the label
        label += " (" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")"
    return summarize(ll, label)


def bernoulli_baseline(train, test, eps: float = 1e-3) -> NatsEstimate:
    """Factorized Bernoulli with per-pixel means fitted on ``train``: log p of ``test`` in nats."""
    train = check_data(train, "train", support="binary", rank=2)
    test = check_data(test, "test", support="binary", rank=2)
    p = train.mean(0).clamp(eps, 1 - eps)
    ll = (test * p.log() + (1 - test) * (1 - p).log()).sum(-1)
    return summarize(ll, "factorized-bernoulli")


# ---------------------------------------------------------------------------------------------
# importance-weighted log-likelihood of any Pyro model/guide pair (Burda et al. 2016)


def iwae_log_likelihood(
    model,
    guide,
    *args,
    k: int = 1000,
    batch_size: int = 100,
    particle_batch: int | None = None,
    data_plate: str = "data",
    **kwargs,
) -> torch.Tensor:
    """Per-point ``log p(x) ~= log (1/k) sum_i p(x, z_i) / q(z_i | x)`` with ``z_i ~ guide``, in nats.

    Works for any model/guide pair whose latent and observed sites all sit inside the plate
    ``data_plate`` over data points (a VAE's local ``z``, an enumerable label, ...). ``args``
    are what the model is called with; every tensor whose first dimension is the number of
    data points is cut into chunks of ``batch_size`` points, and the ``k`` particles are drawn
    ``particle_batch`` at a time (default: about 50,000 point-particles per pass), so memory
    stays bounded for any ``k``. Model latents that the guide does not sample are drawn from
    their prior, which is then the proposal for them and cancels from the weight.

    With ``k=1`` the mean is an unbiased estimate of the ELBO; it is non-decreasing in
    expectation as ``k`` grows and converges to ``log p(x)``.
    """
    if not callable(model) or not callable(guide):
        raise TypeError(
            f"model and guide must be callable Pyro programs, got {type(model).__name__} and {type(guide).__name__}"
        )
    for arg, val in (("k", k), ("batch_size", batch_size)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{arg} must be a positive int, got {val!r}")
    if particle_batch is not None and (not isinstance(particle_batch, int) or particle_batch < 1):
        raise ValueError(f"particle_batch must be a positive int or None, got {particle_batch!r}")
    if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() == 0:
        raise ValueError(
            "expected the data as the first positional argument: a tensor with one row per point, "
            f"got {type(args[0]).__name__ if args else 'nothing'}"
        )
    n = args[0].shape[0]
    if n == 0:
        raise ValueError("expected at least one data point, got an empty tensor")
    particle_batch = particle_batch or max(1, min(k, 50_000 // batch_size))
    nesting = _max_plate_nesting(model, guide, _rows(args, n, 0, min(n, 2)), kwargs)
    out = []
    with torch.no_grad(), progress_bar(n, f"IWAE k={k}") as bar:
        for start in range(0, n, batch_size):
            chunk = _rows(args, n, start, min(start + batch_size, n))
            lw = [
                _log_weights(model, guide, chunk, kwargs, min(particle_batch, k - i), nesting, data_plate)
                for i in range(0, k, particle_batch)
            ]
            out.append(torch.logsumexp(torch.cat(lw), 0) - math.log(k))
            bar.update(len(out[-1]))
    return torch.cat(out)


def _rows(args, n, start, stop):
    return tuple(a[start:stop] if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == n else a for a in args)


def _is_weighted(site) -> bool:
    from pyro.poutine.util import site_is_subsample

    return (
        site["type"] == "sample"
        and not site_is_subsample(site)
        and not site["infer"].get("_deterministic")
        and not site["infer"].get("is_auxiliary")
    )


def _max_plate_nesting(model, guide, args, kwargs) -> int:
    from pyro import poutine

    with poutine.block(), torch.no_grad():
        gtr = poutine.trace(guide).get_trace(*args, **kwargs)
        mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(*args, **kwargs)
    dims = [
        f.dim
        for tr in (gtr, mtr)
        for s in tr.nodes.values()
        if s["type"] == "sample"
        for f in s["cond_indep_stack"]
        if f.vectorized and f.dim is not None
    ]
    return max([1, *(-d for d in dims)])


def _log_weights(model, guide, args, kwargs, particles, nesting, data_plate) -> torch.Tensor:
    """``log p(x, z) - log q(z | x)`` shaped ``(particles, points)``."""
    import pyro
    from pyro import poutine

    with poutine.block(), pyro.plate("_iwae_particles", particles, dim=-(nesting + 1)):
        gtr = poutine.trace(guide).get_trace(*args, **kwargs)
        mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(*args, **kwargs)
    gtr.compute_log_prob(site_filter=lambda name, site: _is_weighted(site))
    mtr.compute_log_prob(site_filter=lambda name, site: _is_weighted(site))
    total = torch.zeros(())
    for name, site in mtr.nodes.items():
        if not _is_weighted(site):
            continue
        if site["is_observed"]:
            total = total + _per_point(site, nesting, data_plate)
        elif name in gtr.nodes:
            total = total + _per_point(site, nesting, data_plate) - _per_point(gtr.nodes[name], nesting, data_plate)
    n = args[0].shape[0]
    return total.expand(particles, n)


def _per_point(site, nesting, data_plate) -> torch.Tensor:
    """A site's log-density summed over every dim except (particles, data points)."""
    frame = next((f for f in site["cond_indep_stack"] if f.name == data_plate and f.vectorized), None)
    if frame is None:
        raise ValueError(
            f"site {site['name']!r} is outside the plate {data_plate!r} over data points; a per-point "
            f"log p(x) needs every latent and observed site inside it (pass data_plate= if it is named otherwise)"
        )
    lp = site["log_prob"]
    lp = lp.reshape((1,) * (nesting + 1 - lp.dim()) + lp.shape)
    lp = lp.movedim(frame.dim, -1)
    return lp.reshape(lp.shape[0], -1, lp.shape[-1]).sum(1)


# ---------------------------------------------------------------------------------------------
# sample quality: one axis for likelihood models and implicit ones (GANs) alike


def _points(x, name: str, like: torch.Tensor | None = None) -> torch.Tensor:
    x = check_data(x, name, rank=2)
    if like is not None:
        if x.shape[1] != like.shape[1]:
            raise ValueError(f"{name}: expected {like.shape[1]} columns to match the other sample, got {x.shape[1]}")
        x = x.to(like.device)
    return x.double()


@dataclass(frozen=True)
class MMDResult:
    """Unbiased squared MMD with a Gaussian-kernel mixture; ``p_value`` from a permutation test."""

    mmd2: float
    p_value: float | None
    bandwidths: tuple
    num_permutations: int

    def __str__(self) -> str:
        p = f", permutation p = {self.p_value:.3g}" if self.p_value is not None else ""
        return f"MMD^2 = {self.mmd2:.4g}{p}"


def median_distance(x: torch.Tensor, max_points: int = 1000) -> float:
    """Median pairwise Euclidean distance (the median heuristic for a kernel bandwidth)."""
    x = x[:max_points]
    d = torch.pdist(x)
    return float(d.median()) if d.numel() else 1.0


def _mmd2_stats(K: torch.Tensor, labels: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Unbiased MMD^2 for each row of ``labels`` (1 marks the first sample) given the pooled kernel."""
    Kz = K - torch.diag_embed(K.diagonal())
    a = labels.to(K.dtype)
    b = 1 - a
    aKa = ((a @ Kz) * a).sum(-1)
    bKb = ((b @ Kz) * b).sum(-1)
    aKb = ((a @ Kz) * b).sum(-1)
    return aKa / (n * (n - 1)) + bKb / (m * (m - 1)) - 2 * aKb / (n * m)


def mmd(x, y, bandwidth=None, num_permutations: int = 0, seed: int = 0) -> MMDResult:
    """Kernel maximum mean discrepancy between samples ``x`` (n, d) and ``y`` (m, d).

    The kernel is a sum of Gaussian RBFs ``exp(-|a-b|^2 / (2 h^2))`` over ``bandwidth`` (a number
    or a list; None: the median pairwise distance of the pooled sample times 0.25, 0.5, 1 and 2,
    which sees both fine and coarse structure). With ``num_permutations > 0`` the p-value of the
    hypothesis that both samples share a law is ``(1 + #{permuted >= observed}) / (1 + P)``.
    """
    x = _points(x, "x")
    y = _points(y, "y", like=x)
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"mmd needs at least 2 points in each sample, got {n} and {m}")
    if not isinstance(num_permutations, int) or num_permutations < 0:
        raise ValueError(f"num_permutations must be a non-negative int, got {num_permutations!r}")
    z = torch.cat([x, y])
    if bandwidth is None:
        med = median_distance(z[torch.randperm(n + m, generator=torch.Generator().manual_seed(seed))])
        bandwidths = tuple(med * f for f in (0.25, 0.5, 1.0, 2.0))
    else:
        bandwidths = tuple(float(h) for h in (bandwidth if isinstance(bandwidth, (list, tuple)) else [bandwidth]))
        if not all(h > 0 for h in bandwidths):
            raise ValueError(f"bandwidth must be positive, got {bandwidth!r}")
    d2 = torch.cdist(z, z).pow(2)
    K = sum((torch.exp(-d2 / (2 * h * h)) for h in bandwidths), torch.zeros((), device=z.device))
    labels = torch.cat([torch.ones(n), torch.zeros(m)]).to(z.device)
    observed = float(_mmd2_stats(K, labels, n, m))
    p_value = None
    if num_permutations:
        gen = torch.Generator().manual_seed(seed)
        perms = torch.stack([labels.cpu()[torch.randperm(n + m, generator=gen)] for _ in range(num_permutations)])
        stats = torch.cat([_mmd2_stats(K, chunk.to(z.device), n, m) for chunk in perms.split(64)])
        p_value = float((1 + (stats >= observed).sum()) / (1 + num_permutations))
    return MMDResult(observed, p_value, bandwidths, num_permutations)


@dataclass(frozen=True)
class PrecisionRecall:
    """k-NN precision (fidelity) and recall (coverage) of Kynkäänniemi et al. (2019)."""

    precision: float
    recall: float
    k: int


def _knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # the 1st smallest is the point itself


def precision_recall(real, fake, k: int = 3) -> PrecisionRecall:
    """Precision: share of ``fake`` inside the union of k-NN balls of ``real``; recall: the reverse."""
    real = _points(real, "real")
    fake = _points(fake, "fake", like=real)
    if not isinstance(k, int) or k < 1 or k >= min(len(real), len(fake)):
        raise ValueError(f"k must be an int in [1, min(n_real, n_fake) - 1], got {k!r}")
    r_real, r_fake = _knn_radii(real, k), _knn_radii(fake, k)
    d = torch.cdist(fake, real)  # (n_fake, n_real)
    precision = (d <= r_real.unsqueeze(0)).any(1).double().mean()
    recall = (d.T <= r_fake.unsqueeze(0)).any(1).double().mean()
    return PrecisionRecall(float(precision), float(recall), k)


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(x, y, features=None) -> float:
    """``|mu_x - mu_y|^2 + Tr(S_x + S_y - 2 (S_x^1/2 S_y S_x^1/2)^1/2)`` of Gaussians fitted to
    the features of ``x`` and ``y``; ``features`` is None (raw values), ``"digits"`` (the
    penultimate layer of :func:`digits_classifier`, an FID for 8x8 digits) or a callable."""
    x = _points(x, "x")
    y = _points(y, "y", like=x)
    if features == "digits":
        net = digits_classifier()
        features = net.features
    if features is not None:
        if not callable(features):
            raise TypeError(f"features must be None, 'digits' or a callable, got {type(features).__name__}")
        with torch.no_grad():
            x, y = features(x.float()).double(), features(y.float()).double()
    mx, my = x.mean(0), y.mean(0)
    sx, sy = torch.atleast_2d(torch.cov(x.T)), torch.atleast_2d(torch.cov(y.T))
    root = _sqrtm_psd(sx)
    cross = torch.linalg.eigvalsh(root @ sy @ root).clamp_min(0).sqrt().sum()
    return float((mx - my).pow(2).sum() + sx.trace() + sy.trace() - 2 * cross)


def modes_covered(samples, centres, max_dist: float, min_count: int = 1) -> tuple[int, float]:
    """How many ``centres`` have at least ``min_count`` samples within ``max_dist`` (nearest centre),
    and the share of samples within ``max_dist`` of some centre (the "high quality" fraction)."""
    samples = _points(samples, "samples")
    centres = _points(centres, "centres", like=samples)
    d = torch.cdist(samples, centres)
    near, which = d.min(1)
    close = near <= max_dist
    counts = torch.bincount(which[close], minlength=centres.shape[0])
    return int((counts >= min_count).sum()), float(close.double().mean())


# ---------------------------------------------------------------------------------------------
# a small digits classifier whose hidden layer is the feature space of the Fréchet distance

DIGITS_CLASSIFIER = {"hidden": [128, 64], "steps": 400, "lr": 3e-3, "weight_decay": 1e-4, "seed": 0}


class DigitsClassifier(torch.nn.Module):
    """An MLP on flat 8x8 digits; ``features(x)`` is its last hidden layer."""

    def __init__(self, hidden=(128, 64), in_dim: int = 64, classes: int = 10):
        super().__init__()
        from ppdgm.nn import MLP

        self.body = MLP(in_dim, list(hidden[:-1]), hidden[-1], "relu")
        self.head = torch.nn.Linear(hidden[-1], classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        p = self.head.weight
        return torch.relu(self.body(x.to(device=p.device, dtype=p.dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _cache_dir():
    import os
    import tempfile
    from pathlib import Path

    for base in (
        os.environ.get("PPDGM_CACHE"),
        Path.home() / ".cache" / "ppdgm",
        Path(tempfile.gettempdir()) / "ppdgm-cache",
    ):
        if base is None:
            continue
        try:
            Path(base).mkdir(parents=True, exist_ok=True)
            if os.access(base, os.W_OK):
                return Path(base)
        except OSError:
            continue
    raise OSError("no writable cache folder (set PPDGM_CACHE)")


def _train_digits_classifier(config: dict) -> DigitsClassifier:
    from ppdgm.data import load_digits

    train, binary = load_digits("train"), load_digits("train", binarize=True)
    if train.y is None or binary.y is None:
        raise ValueError("digits: the classifier needs the training labels, and the split has none")
    x, y = torch.cat([train.x, binary.x]), torch.cat([train.y, binary.y])
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(config["seed"])
    try:
        net = DigitsClassifier(config["hidden"])
        opt = torch.optim.Adam(net.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
        for _ in range(config["steps"]):
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.random.set_rng_state(gen_state)
    return net.eval()


_CLASSIFIERS: dict = {}


def digits_classifier(cache_dir=None) -> DigitsClassifier:
    """The feature network for digit Fréchet distances: trained once, deterministically (seed 0,
    full-batch Adam on the training split, continuous and binarized), then cached on disk under
    ``PPDGM_CACHE`` or ``~/.cache/ppdgm`` in a file named by a hash of its recipe."""
    import hashlib
    import json

    from ppdgm.fit import atomic_save, safe_load

    digest = hashlib.sha256(json.dumps({**DIGITS_CLASSIFIER, "split": "train-1200"}, sort_keys=True).encode())
    key = digest.hexdigest()[:16]
    if key in _CLASSIFIERS:
        return _CLASSIFIERS[key]
    path = ((cache_dir and __import__("pathlib").Path(cache_dir)) or _cache_dir()) / f"digits_classifier-{key}.pt"
    net = DigitsClassifier(DIGITS_CLASSIFIER["hidden"])
    loaded = False
    if path.exists():
        try:
            net.load_state_dict(safe_load(path))
            loaded = True
        except (ValueError, RuntimeError, KeyError):
            loaded = False  # a damaged cache file is rebuilt
    if not loaded:
        net = _train_digits_classifier(DIGITS_CLASSIFIER)
        atomic_save(net.state_dict(), path)
    net.eval().requires_grad_(False)
    _CLASSIFIERS[key] = net
    return net


def sample_quality(real, fake, features=None, k: int = 3, num_permutations: int = 0, seed: int = 0) -> dict:
    """MMD (raw values), k-NN precision/recall and Fréchet distance (in ``features``) in one dict."""
    m = mmd(real, fake, num_permutations=num_permutations, seed=seed)
    pr = precision_recall(real, fake, k=k)
    fd = frechet_distance(real, fake, features=features)
    return {"mmd2": m.mmd2, "mmd_p_value": m.p_value, "precision": pr.precision, "recall": pr.recall, "frechet": fd}
