"""Restricted Boltzmann machines: Bernoulli-Bernoulli, Gaussian-Bernoulli and replicated softmax.

The joint is a Pyro program: the visible and hidden units are ``pyro.sample`` sites under
uniform priors and the energy enters as ``pyro.factor("energy", -E(v, h))``; the guide is the
exact conditional p(h | v), so the ELBO is ``-F(v)`` up to the priors' constant. Training opts
into :class:`ppdgm.inference.pcd.PersistentCD` (positive phase ``-F(v)`` on data, negative phase
``-F(v)`` on persistent block-Gibbs chains); log-likelihoods come from AIS or, for tiny models,
exact enumeration. The trained RBM keeps the persistent chains of training (saved with the module)
and :meth:`sample` continues them, so the draws represent the model without a long burn-in.

Visible ``units``: ``bernoulli`` (binary data), ``gaussian`` (real data, unit or learned
variances; Hinton 2010's ``x/sigma`` parameterization) or ``softmax`` (word counts; the
replicated softmax of Salakhutdinov & Hinton 2009, whose hidden biases scale with document length).
"""

from __future__ import annotations

import math
from typing import ClassVar

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn
from torch.distributions import constraints

from ppdgm.boltzmann import LayeredEnergy, bernoulli, check_sparsity, cycled_rows, sparsity_penalty
from ppdgm.data import check_data
from ppdgm.models.spec import ConstructorSpec

SUPPORT_OF_UNITS = {"bernoulli": "binary", "gaussian": "real", "softmax": "counts"}


class RBM(ConstructorSpec, PyroModule):
    """``RBM(features=64, hidden_units=128, units="bernoulli")``.

    Args:
        features, hidden_units: the sizes of the visible and the hidden layer.
        units: visible units, ``bernoulli`` | ``gaussian`` | ``softmax``.
        sigma: initial standard deviation of gaussian visible units; ``learn_sigma`` learns it.
        init_scale: standard deviation of the initial weights.
        temperatures: persistent chains at this many inverse temperatures from 1 down to
            ``min_beta``, swapped between neighbours after each Gibbs sweep (parallel tempering,
            Desjardins et al. 2010); the negative phase uses the ``beta = 1`` replicas.
            (:meth:`sample` tempers on its own from noise, with its ``temperatures`` argument.)
        sparsity_cost: weight of the sparsity penalty (:meth:`regularizer`) that training adds to
            its loss; 0 (the default): none.
        sparsity_target: the mean activation the penalty asks of the hidden units.

    ``chains``: the visible states of the persistent chains of the last negative phase of training
    (the ``beta = 1`` replicas when tempering), or None before training. They live on the model's
    device and dtype, are saved with the module (``ppdgm.save``, checkpoints) and are where
    :meth:`sample` starts.
    """

    datasets = ("digits-binary",)

    default_engine = "pcd"
    # Adam with a decaying rate learns digits in a few thousand updates; PCD's plain-SGD default
    # (lr 1e-3) needs ten times as many (the RBM tests measure these settings). 500 chains of 5
    # sweeps per update: with PCD's 100 chains of 1 sweep the model learns a distribution whose
    # own samples over-represent a few digits (bench_samplers, tempered draws: Fréchet 5.6x the
    # floor against 2.2x to 4.1x over three sampling seeds; test NLL 17.48 against 16.82). 10
    # sweeps rather than 5 (bench_samplers, 6000 updates): test NLL 16.18 against 16.37, at 5% more time.
    # The rate decaying to 1% of lr (not the engine's 10%) and weight decay 1e-3 (not 1e-4), trained
    # 20000 updates rather than 6000 (seed 0, AIS over 2 seeds): 15.86 against 16.27 (16.13 with the
    # decay alone at 6000); 12000 updates 15.97. 192 hidden units: 15.84 / 15.96 / 15.89 on seeds 0-2;
    # with the sparsity penalty (sparsity_cost=0.01, target 0.2), seeds 0-5: 15.84 against 15.88
    engine_config: ClassVar[dict] = {
        "optim": "adam",
        "lr": 0.01,
        "lr_schedule": "linear",
        "lr_final_factor": 0.01,
        "weight_decay": 1e-3,
        "num_chains": 500,
        "k": 10,
    }
    likelihood_method = "ais"
    support = "binary"

    def __init__(
        self,
        features: int = 64,
        hidden_units: int = 128,
        units: str = "bernoulli",
        sigma: float = 1.0,
        learn_sigma: bool = False,
        init_scale: float = 0.01,
        temperatures: int = 1,
        min_beta: float = 0.5,
        sparsity_cost: float = 0.0,
        sparsity_target: float = 0.1,
    ):
        super().__init__()
        for arg, val in (("features", features), ("hidden_units", hidden_units)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{arg} must be a positive int, got {val!r}")
        if units not in SUPPORT_OF_UNITS:
            raise ValueError(f"units must be one of {tuple(SUPPORT_OF_UNITS)}, got {units!r}")
        if not (isinstance(sigma, (int, float)) and sigma > 0):
            raise ValueError(f"sigma must be a positive number, got {sigma!r}")
        if not (isinstance(init_scale, (int, float)) and init_scale >= 0):
            raise ValueError(f"init_scale must be a non-negative number, got {init_scale!r}")
        if isinstance(temperatures, bool) or not isinstance(temperatures, int) or temperatures < 1:
            raise ValueError(f"temperatures must be a positive int, got {temperatures!r}")
        if temperatures > 1 and units != "bernoulli":
            raise ValueError(f"temperatures > 1 (parallel tempering) needs bernoulli visible units, got {units!r}")
        if not (isinstance(min_beta, (int, float)) and 0 <= min_beta < 1):
            raise ValueError(f"min_beta must be a number in [0, 1), got {min_beta!r}")
        self.temperatures, self.min_beta = temperatures, float(min_beta)
        self.sparsity_cost, (self.sparsity_target,) = check_sparsity(sparsity_cost, sparsity_target, 1)
        self._sparsity_batch: torch.Tensor | None = None  # the latest positive phase's data
        self.features, self.hidden_units, self.units = features, hidden_units, units
        self.sigma0, self.learn_sigma, self.init_scale = float(sigma), bool(learn_sigma), float(init_scale)
        self.support = SUPPORT_OF_UNITS[units]
        self.W = nn.Parameter(init_scale * torch.randn(features, hidden_units))
        self.b = nn.Parameter(torch.zeros(features))
        self.c = nn.Parameter(torch.zeros(hidden_units))
        log_sigma = torch.full((features,), math.log(sigma))
        if learn_sigma:
            self.log_sigma = nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma)
        # a buffer so that .to() moves it; saved through get_extra_state, since its shape is the run's
        self.register_buffer("chains", None, persistent=False)

    def get_extra_state(self) -> dict:
        chains = self._buffers["chains"]
        # a copy: the beta = 1 replicas are a view of the tempered state, which would be saved whole
        return {"chains": chains.detach().clone() if chains is not None else torch.zeros(0, self.features)}

    def set_extra_state(self, state) -> None:
        """Restores the kept chains; a state without them (an RBM saved before they were kept) leaves none."""
        chains = state.get("chains") if isinstance(state, dict) else None
        if not isinstance(chains, torch.Tensor) or chains.numel() == 0:
            self._buffers["chains"] = None
            return
        if chains.dim() != 2 or chains.shape[1] != self.features:
            raise ValueError(
                f"chains: expected saved chains of shape (num_chains, {self.features}), got {tuple(chains.shape)}"
            )
        self._buffers["chains"] = chains.to(self.W)

    @classmethod
    def from_data(cls, data, graph=None, **kwargs):
        """Sizes from the data, or ``graph=`` (a layer graph, node-link dict or .json path) checked against it."""
        if graph is not None:
            obj = cls.from_graph(graph, **kwargs)
            if obj.features != data.x.shape[1]:
                raise ValueError(
                    f"graph: the visible layer has {obj.features} units but {data.name} has {data.x.shape[1]} columns"
                )
            return obj
        return cls(features=int(data.x.shape[1]), **kwargs)

    @classmethod
    def from_graph(cls, graph, **kwargs):
        """An RBM from a two-layer :class:`ppdgm.graphs.LayerGraph` (or networkx graph)."""
        from ppdgm.graphs import LayerGraph

        g = graph if isinstance(graph, LayerGraph) else LayerGraph(graph)
        if len(g.layers) != 2 or len(g.visible) != 1:
            raise ValueError(f"graph: an RBM needs one visible and one hidden layer, got layers {g.layers}")
        v, h = g.visible[0], g.hidden[0]
        if g.units(h) != "bernoulli":
            raise ValueError(f"graph: the RBM's hidden layer {h!r} must have bernoulli units, got {g.units(h)!r}")
        return cls(features=g.size(v), hidden_units=g.size(h), units=g.units(v), **kwargs)

    # -- energy -----------------------------------------------------------------------------
    def energy_graph(self, length: int | None = None) -> LayeredEnergy:
        """The layered energy (visible layer 0, hidden layer 1) for AIS and exact partition
        functions; a replicated softmax needs the document ``length`` (its hidden biases scale
        with it, and its partition function sums over word sequences of that length)."""
        if self.units != "softmax":
            return LayeredEnergy(
                ["v", "h"],
                [self.units, "bernoulli"],
                [True, False],
                [self.b, self.c],
                [(0, 1, self.W)],
                [self.log_sigma, None],
            )
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(
                f"length: a replicated softmax's energy needs a positive int document length, got {length!r}"
            )
        return LayeredEnergy(
            ["v", "h"],
            ["softmax", "bernoulli"],
            [True, False],
            [self.b, self.c * length],
            [(0, 1, self.W)],
            counts={0: length},
        )

    def _raw(self):
        """``(W, b, c, log_sigma)`` straight from the module's dicts: the PCD loop skips PyroModule's
        param-store lookups, which cost more than an RBM step's arithmetic. The Pyro program
        (``model``/``guide``) reads them as attributes, so Pyro sees its parameters."""
        p = self._parameters
        return p["W"], p["b"], p["c"], p["log_sigma"] if self.learn_sigma else self._buffers["log_sigma"]

    def hidden_natural(self, v: torch.Tensor) -> torch.Tensor:
        """Logits of p(h = 1 | v)."""
        W, _, c, log_sigma = self._raw()
        return _hidden_natural(self.units, v, W, c, log_sigma)

    def visible_own(self, v: torch.Tensor) -> torch.Tensor:
        _, b, _, log_sigma = self._raw()
        return _visible_own(self.units, v, b, log_sigma)

    def energy(self, v: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return -(self.visible_own(v) + (self.hidden_natural(v) * h).sum(-1))

    def free_energy(self, v: torch.Tensor) -> torch.Tensor:
        """``F(v) = -log sum_h exp(-E(v, h))``."""
        return -(self.visible_own(v) + nn.functional.softplus(self.hidden_natural(v)).sum(-1))

    # -- conditionals -----------------------------------------------------------------------
    def hidden_mean(self, v):
        return torch.sigmoid(self.hidden_natural(v))

    def visible_natural(self, h):
        W, b, _, _ = self._raw()
        if self.units == "gaussian":
            return h @ W.T
        return torch.addmm(b, h, W.T)

    def visible_mean(self, h, counts=None):
        eta = self.visible_natural(h)
        if self.units == "bernoulli":
            return torch.sigmoid(eta)
        _, b, _, log_sigma = self._raw()
        if self.units == "gaussian":
            return b + log_sigma.exp() * eta
        return torch.softmax(eta, -1) * (1 if counts is None else counts.unsqueeze(-1))

    def sample_visible(self, h, counts=None):
        if self.units == "bernoulli":
            return bernoulli(torch.sigmoid(self.visible_natural(h)))
        if self.units == "gaussian":
            mean = self.visible_mean(h)
            return mean + self._raw()[3].exp() * torch.randn_like(mean)
        from ppdgm.boltzmann import _multinomial_counts

        return _multinomial_counts(torch.softmax(self.visible_natural(h), -1), counts)

    @torch.no_grad()
    def gibbs(self, v: torch.Tensor, steps: int = 1) -> torch.Tensor:
        """``steps`` sweeps of block Gibbs v -> h -> v (document lengths kept for softmax units)."""
        counts = v.sum(-1) if self.units == "softmax" else None
        for _ in range(steps):
            h = bernoulli(self.hidden_mean(v))
            v = self.sample_visible(h, counts)
        return v

    # -- persistent-CD protocol -------------------------------------------------------------
    def positive_log_density(self, v):
        if self.sparsity_cost:
            self._sparsity_batch = v
        return -self.free_energy(v)

    def regularizer(self) -> torch.Tensor:
        """The sparsity penalty (:func:`ppdgm.boltzmann.sparsity_penalty`) on the hidden units'
        posterior means for the latest positive batch; 0 without one."""
        v, self._sparsity_batch = self._sparsity_batch, None
        if not self.sparsity_cost or v is None:
            return self.c.new_zeros(())
        return sparsity_penalty(self.sparsity_cost, [self.hidden_mean(v)], [self.sparsity_target])

    def negative_log_density(self, v):
        return -self.free_energy(v[0] if v.dim() == 3 else v)

    @torch.no_grad()
    def contrastive_grads(self, v: torch.Tensor, chains: torch.Tensor):
        """The PCD loss's gradient in closed form (``.grad`` of W, b, c), and both phases'
        log-densities ``-F``; None (autograd) when the variances are learned or a subclass
        redefines either phase.

        The chains (all of this process's chain blocks) are kept as ``self.chains``
        for :meth:`sample`: a reference, replaced every step, copied only when saved."""
        chains = chains[0] if chains.dim() == 3 else chains  # the beta = 1 replicas when tempering
        self._buffers["chains"] = chains
        if self.sparsity_cost:
            self._sparsity_batch = v
        cls = type(self)
        if (
            self.learn_sigma
            or cls.positive_log_density is not RBM.positive_log_density
            or cls.negative_log_density is not RBM.negative_log_density
        ):
            return None
        W, b, c, log_sigma = self._raw()
        m, k = v.shape[0], chains.shape[0]
        # both phases in one pass: rows weighted -1/m (data) and +1/k (chains) give the loss's gradient
        x = torch.cat([v, chains])
        w = self._phase_weights(m, k, x)
        eta = _hidden_natural(self.units, x, W, c, log_sigma)
        h = torch.sigmoid(eta)
        logd = _visible_own(self.units, x, b, log_sigma) + nn.functional.softplus(eta).sum(-1)
        sx = x / log_sigma.exp() if self.units == "gaussian" else x
        wh = h * w.unsqueeze(-1)
        W.grad = sx.T @ wh
        b.grad = w @ x / log_sigma.exp() ** 2 if self.units == "gaussian" else w @ x
        c.grad = (wh * x.sum(-1, keepdim=True)).sum(0) if self.units == "softmax" else wh.sum(0)
        return logd[:m], logd[m:]

    def _phase_weights(self, m: int, k: int, like: torch.Tensor) -> torch.Tensor:
        key = (m, k, like.device, like.dtype)
        cache = self.__dict__.setdefault("_phase_weight_cache", {})
        if key not in cache:
            cache.clear()
            cache[key] = torch.cat([like.new_full((m,), -1.0 / m), like.new_full((k,), 1.0 / k)])
        return cache[key]

    def init_chains(self, num_chains: int, data: torch.Tensor) -> torch.Tensor:
        """Persistent chains start at training points drawn with replacement (every temperature
        alike: the state is ``(temperatures, num_chains, visible)`` when tempering)."""
        idx = torch.randint(0, data.shape[0], (num_chains,), device=data.device)
        chains = data[idx].clone()
        return chains.expand(self.temperatures, *chains.shape).clone() if self.temperatures > 1 else chains

    def sample_chains(self, state: torch.Tensor, steps: int) -> torch.Tensor:
        return self.tempered_gibbs(state, steps) if state.dim() == 3 else self.gibbs(state, steps)

    def betas(self, like: torch.Tensor) -> torch.Tensor:
        """The inverse temperatures of the replicas in ``like`` (its first dimension), ``1`` first
        down to ``min_beta``, shaped ``(replicas, 1, 1)``."""
        return torch.linspace(1.0, self.min_beta, like.shape[0], dtype=like.dtype, device=like.device).view(-1, 1, 1)

    def tempered_log_density(self, v: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
        """``log sum_h exp(-beta E(v, h))`` of bernoulli units, for each replica's ``beta``."""
        W, b, c, _ = self._raw()
        return betas[..., 0] * (v @ b) + nn.functional.softplus(betas * (v @ W + c)).sum(-1)

    @torch.no_grad()
    def tempered_gibbs(self, state: torch.Tensor, steps: int = 1) -> torch.Tensor:
        """``steps`` sweeps of block Gibbs at every temperature, each followed by swaps of
        neighbouring replicas (even pairs, then odd pairs on the next sweep) with the Metropolis
        acceptance of the exchange. The mean acceptance is kept as ``self.swap_rate``."""
        W, b, c, _ = self._raw()
        betas = self.betas(state)
        accepted, proposed = 0.0, 0
        for sweep in range(steps):
            h = bernoulli(torch.sigmoid(betas * (state @ W + c)))
            state = bernoulli(torch.sigmoid(betas * (h @ W.T + b)))
            lo = torch.arange(sweep % 2, state.shape[0] - 1, 2, device=state.device)
            if len(lo) == 0:
                continue
            hi = lo + 1
            v_lo, v_hi, b_lo, b_hi = state[lo], state[hi], betas[lo], betas[hi]
            log_ratio = (
                self.tempered_log_density(v_hi, b_lo)
                + self.tempered_log_density(v_lo, b_hi)
                - self.tempered_log_density(v_lo, b_lo)
                - self.tempered_log_density(v_hi, b_hi)
            )
            swap = (torch.rand_like(log_ratio).log() < log_ratio).unsqueeze(-1)
            state = state.clone()
            state[lo] = torch.where(swap, v_hi, v_lo)
            state[hi] = torch.where(swap, v_lo, v_hi)
            accepted += float(swap.float().sum())
            proposed += swap.numel()
        self.swap_rate = accepted / proposed if proposed else float("nan")
        return state

    def data_args(self, dataset) -> tuple:
        return (self.check_data(dataset.x, "x"),)

    def check_data(self, x, name: str = "x") -> torch.Tensor:
        x = check_data(x, name, support=self.support, rank=2)
        if x.shape[1] != self.features:
            raise ValueError(
                f"{name}: expected {self.features} columns (the visible layer's size), got shape {tuple(x.shape)}"
            )
        return x.to(dtype=self.W.dtype)  # the device stays the data's: engines move the model to it

    def _input(self, x, name: str = "x") -> torch.Tensor:
        """Validated data on the model's device, for the model's own methods."""
        return self.check_data(x, name).to(self.W.device)

    # -- Pyro program -----------------------------------------------------------------------
    def _visible_prior(self):
        if self.units == "bernoulli":
            return dist.Bernoulli(self.b.new_full((self.features,), 0.5)).to_event(1)
        support = constraints.real if self.units == "gaussian" else constraints.nonnegative_integer
        return dist.ImproperUniform(support, (), (self.features,))

    def model(self, v=None, n: int | None = None):
        """Uniform priors on v and h times ``exp(-E(v, h))``: the RBM's unnormalized joint."""
        n = v.shape[0] if v is not None else n
        with pyro.plate("data", n):
            v = pyro.sample("v", self._visible_prior(), obs=v)
            h = pyro.sample("h", dist.Bernoulli(self.c.new_full((self.hidden_units,), 0.5)).to_event(1))
            W, b, c, log_sigma = self.W, self.b, self.c, self.log_sigma  # registered with Pyro
            eta = _hidden_natural(self.units, v, W, c, log_sigma)
            pyro.factor("energy", _visible_own(self.units, v, b, log_sigma) + (eta * h).sum(-1))
        return v

    def guide(self, v=None, n: int | None = None):
        """The exact posterior p(h | v)."""
        with pyro.plate("data", v.shape[0]):
            eta = _hidden_natural(self.units, v, self.W, self.c, self.log_sigma)
            pyro.sample("h", dist.Bernoulli(logits=eta).to_event(1))

    # -- use --------------------------------------------------------------------------------
    @torch.no_grad()
    def transform(self, x) -> torch.Tensor:
        """Hidden features ``E[h | x]`` for downstream classifiers."""
        return self.hidden_mean(self._input(x))

    @torch.no_grad()
    def reconstruct(self, x) -> torch.Tensor:
        """``E[v | h = E[h | x]]``: one deterministic down-up pass."""
        x = self._input(x)
        return self.visible_mean(self.hidden_mean(x), x.sum(-1) if self.units == "softmax" else None)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        steps: int | None = None,
        counts: int = 1,
        temperatures: int | None = None,
        start: torch.Tensor | None = None,
        from_chains: bool = True,
    ) -> torch.Tensor:
        """``n`` draws of the visible units.

        A trained RBM starts from its kept persistent chains (:attr:`chains`): after a decaying
        learning rate they are spread over the model's modes already, so ``n`` of them in random
        order (cycled when ``n`` is larger) advanced by ``steps`` (default 10) sweeps of plain block
        Gibbs represent the model (softmax documents keep the chains' lengths). On digits, trained
        as ``bench_samplers`` trains it, their Fréchet distance is 2.5 +- 0.1 times the held-out
        floor, against 5.9 +- 0.2 for the tempering from noise below (10 sampling seeds), at a
        thousandth of its cost.

        Without kept chains (an untrained RBM) or with ``from_chains=False``, the draws start from
        random hidden states (softmax documents of length ``counts``) and take ``steps`` (default
        1000) sweeps of parallel tempering over ``temperatures`` (default 10) inverse temperatures
        from 1 to ``min_beta`` (bernoulli units; the ``beta = 1`` replicas are returned), or of
        plain block Gibbs (other units, or ``temperatures=1``). Plain Gibbs from noise settles in
        the few deepest modes and over-represents their digits; the swaps carry the replicas
        between modes.

        ``start``: visible states to continue from instead of the kept chains (a tempering RBM's
        ``(temperatures, chains, visible)`` state gives its ``beta = 1`` replicas), drawn and
        advanced like them; ``temperatures`` then defaults to 1 as well."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if temperatures is not None and (
            isinstance(temperatures, bool) or not isinstance(temperatures, int) or temperatures < 1
        ):
            raise ValueError(f"temperatures must be a positive int or None, got {temperatures!r}")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            raise ValueError(f"steps must be a non-negative int or None, got {steps!r}")
        if not isinstance(from_chains, bool):
            raise TypeError(f"from_chains must be a bool, got {from_chains!r}")
        if start is None and from_chains:
            start = self._buffers["chains"]
        if start is None:
            h = bernoulli(self.c.new_full((n, self.hidden_units), 0.5))
            c = self.c.new_full((n,), float(counts)) if self.units == "softmax" else None
            v = self.sample_visible(h, c)
            steps = 1000 if steps is None else steps
            temperatures = 10 if temperatures is None else temperatures
        else:
            if isinstance(start, torch.Tensor) and start.dim() == 3 and self.temperatures > 1:
                start = start[0]  # training chains of a tempering RBM: its beta = 1 replicas
            start = self._input(start, "start")
            v = start[cycled_rows(n, start.shape[0], start.device)]
            steps = 10 if steps is None else steps
            temperatures = 1 if temperatures is None else temperatures
        if self.units != "bernoulli" or temperatures == 1:
            return self.gibbs(v, steps)
        return self.tempered_gibbs(v.expand(temperatures, *v.shape).clone(), steps)[0]

    @torch.no_grad()
    def log_partition(self, method: str = "ais", base_data=None, length: int | None = None, **ais_kwargs):
        """``log Z`` as an :class:`ppdgm.ais.LogZ` (``method`` ``ais`` or ``exact``);
        ``length`` is the document length of a replicated softmax."""
        from ppdgm.ais import annealed_importance_sampling, exact_log_partition

        energy = self.energy_graph(length)
        if method == "exact":
            return exact_log_partition(energy)
        if method != "ais":
            raise ValueError(f"method must be 'ais' or 'exact', got {method!r}")
        base = None if base_data is None else {0: self._input(base_data, "base_data")}
        return annealed_importance_sampling(energy, base_data=base, **ais_kwargs)

    @torch.no_grad()
    def log_likelihood(self, x, method: str = "ais", base_data=None, **ais_kwargs) -> torch.Tensor:
        """Per-point ``log p(x) = -F(x) - log Z`` in nats (``log Z`` by AIS, or exact enumeration).

        The estimate of ``log Z`` is kept as ``self.last_log_z``. AIS's base-rate model is fitted
        to ``base_data`` (default: ``x``). For a replicated softmax ``log Z`` is estimated per
        document length (``self.last_log_z`` is then ``{length: LogZ}``) and ``log p`` is that of
        the document's word sequence."""
        x = self._input(x)
        base = x if base_data is None else base_data
        if method != "ais":
            ais_kwargs, base = {}, None
        if self.units != "softmax":
            self.last_log_z = self.log_partition(method, base_data=base, **ais_kwargs)
            return -self.free_energy(x) - self.last_log_z.value
        lengths = x.sum(-1).round().long()
        self.last_log_z = {
            int(n): self.log_partition(method, base_data=base, length=int(n), **ais_kwargs)
            for n in lengths.unique().tolist()
            if n > 0
        }
        empty = self.hidden_units * math.log(2)  # an empty document: only the hidden units sum
        log_z = torch.tensor(
            [self.last_log_z[int(n)].value if n > 0 else empty for n in lengths.tolist()],
            dtype=x.dtype,
            device=x.device,
        )
        return -self.free_energy(x) - log_z


def _hidden_natural(units, v, W, c, log_sigma):
    if units == "softmax":
        c = c * v.sum(-1, keepdim=True)
    elif units == "gaussian":
        v = v / log_sigma.exp()
    return torch.addmm(c, v, W) if v.dim() == 2 and c.dim() <= 2 else v @ W + c


def _visible_own(units, v, b, log_sigma):
    if units == "gaussian":
        return -(((v - b) / log_sigma.exp()) ** 2).sum(-1) / 2
    return v @ b
