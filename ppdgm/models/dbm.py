"""Deep Boltzmann machines on a networkx layer graph, and the multimodal DBM.

The joint is a Pyro program (uniform priors on every layer, ``pyro.factor("energy", -E)``) and
the mean-field posterior q(h | v) = prod_l Bernoulli(mu_l) is its Pyro guide, with ``mu`` from
fixed-point iterations over the graph's two Gibbs blocks (Salakhutdinov & Hinton 2009). Training
opts into :class:`ppdgm.inference.pcd.PersistentCD`: the positive phase is the mean-field bound
``E_q[-E(v, h)] + H(q)`` (its gradient is the data-dependent statistics at ``mu``), the negative
phase ``-E`` on persistent chains advanced by block Gibbs over the two colours. Greedy layer-wise
pretraining with doubled weights at the ends of the stack initializes a chain DBM.

A multimodal DBM (Srivastava & Salakhutdinov 2012) is a graph with two visible layers joined at a
shared top; ``complete({"pixels": x})`` fills in the other modality by clamped mean-field, so
with a one-hot label layer it is a generative classifier, and ``complete({"label": y},
method="gibbs")`` draws that digit's pixels by their conditional mean under clamped block Gibbs.
"""

from __future__ import annotations

import itertools
import math
from typing import ClassVar

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from torch import nn
from torch.distributions import constraints

from ppdgm.boltzmann import LayeredEnergy, bernoulli, check_sparsity, cycled_rows, sparsity_penalty
from ppdgm.data import check_data
from ppdgm.graphs import LayerGraph, dbm_graph, multimodal_graph
from ppdgm.models.spec import ConstructorSpec

SUPPORT_OF_UNITS = {"bernoulli": "binary", "gaussian": "real", "softmax": "counts"}
POSITIVE_PHASES = ("gibbs", "mean-field")


class DBM(ConstructorSpec, PyroModule):
    """``DBM(sizes=[64, 128, 64])`` or ``DBM(graph=nx_graph)`` (hidden layers bernoulli).

    Args:
        graph: a networkx ``Graph``, :class:`LayerGraph` or node-link dict; or ``sizes`` for a chain.
        units: the visible units when built from ``sizes``.
        init_scale: standard deviation of the initial weights.
        mean_field_steps: fixed-point sweeps of the mean-field guide.
        pretrain_epochs: epochs of greedy layer-wise pretraining (:meth:`pretrain`) that persistent
            CD runs before its chains start, unless the model was pretrained already; 0: none.
        positive_phase: how training estimates the data-dependent statistics. ``"gibbs"``: one
            Gibbs colour's hidden layers are summed out in closed form and the other's drawn from
            p(h | v) by ``positive_sweeps`` sweeps of clamped block Gibbs started at the mean-field
            state, an unbiased stochastic gradient of ``log p(v)`` (:meth:`collapsed_log_density`).
            ``"mean-field"``: the gradient of the mean-field bound (Salakhutdinov & Hinton 2009),
            which also pushes the model towards factorial posteriors (on digits, same settings:
            test NLL 16.74 nats against the Gibbs phase's 16.37).
        positive_sweeps: clamped Gibbs sweeps per update of the ``"gibbs"`` positive phase.
        sparsity_cost: weight of the sparsity penalty (:meth:`regularizer`) that training adds to
            its loss; 0 (the default): none.
        sparsity_target: the mean activation the penalty asks of each hidden layer's units, one
            number for all or one per hidden layer in graph order.
    """

    datasets = ("digits-binary",)

    default_engine = "pcd"
    # bench_dbm_vs_rbm protocol (batches of 100 digits, test NLL by AIS on the importance bound,
    # training seeds 0 / 1 / 2): 20000 updates with the rate decaying linearly to 1% of lr give
    # 15.87 / 15.86 / 16.01 nats (the 192-hidden RBM, same settings: 15.84 / 15.96 / 15.89); to 10%
    # (the engine's default) at 12000 updates 16.37 / 16.25 / 16.17, to 1% 15.97 / 15.89 / 15.98;
    # 30000 updates 15.94 (seed 0); weight decay 2e-3 16.13 / 16.07; no pretraining 16.07; layers
    # 96 + 96 16.10, 64 + 128 16.44; an EMA of the weights (0.999) adds nothing to the decay.
    # At 6000 updates and weight decay 3e-4: 16.24, 1e-4 16.37; lr 5e-3 16.28, 2e-2 16.43; k=5 with
    # the mean-field positive phase (the settings before) 16.77-16.92, k=10 16.74. The sparsity
    # penalty (sparsity_cost=0.01, targets 0.2 / 0.1; seeds 0-5): 15.85 against 15.89, as much as it
    # gives the 192-hidden RBM (15.84 against 15.88); off by default until the family table is rerun
    engine_config: ClassVar[dict] = {
        "optim": "adam",
        "lr": 0.01,
        "lr_schedule": "linear",
        "lr_final_factor": 0.01,
        "weight_decay": 1e-3,
        "k": 10,
        "num_chains": 500,
    }
    likelihood_method = "ais-importance-bound"
    support = "binary"

    def __init__(
        self,
        graph=None,
        sizes=None,
        units: str = "bernoulli",
        init_scale: float = 0.01,
        mean_field_steps: int = 10,
        pretrain_epochs: int = 30,
        positive_phase: str = "gibbs",
        positive_sweeps: int = 1,
        sparsity_cost: float = 0.0,
        sparsity_target=0.1,
    ):
        super().__init__()
        if (graph is None) == (sizes is None):
            raise ValueError("give exactly one of graph= (a networkx layer graph) or sizes= (a list of layer sizes)")
        g = dbm_graph(sizes, units=units) if sizes is not None else LayerGraph(graph)
        if g.directed:
            raise ValueError("graph: a DBM's layer graph is undirected (nx.Graph); a DiGraph describes a DBN")
        for layer in g.hidden:
            if g.units(layer) != "bernoulli":
                raise ValueError(f"graph: hidden layer {layer!r} must have bernoulli units, got {g.units(layer)!r}")
        if isinstance(mean_field_steps, bool) or not isinstance(mean_field_steps, int) or mean_field_steps < 1:
            raise ValueError(f"mean_field_steps must be a positive int, got {mean_field_steps!r}")
        if not (isinstance(init_scale, (int, float)) and init_scale >= 0):
            raise ValueError(f"init_scale must be a non-negative number, got {init_scale!r}")
        if isinstance(pretrain_epochs, bool) or not isinstance(pretrain_epochs, int) or pretrain_epochs < 0:
            raise ValueError(f"pretrain_epochs must be a non-negative int, got {pretrain_epochs!r}")
        if positive_phase not in POSITIVE_PHASES:
            raise ValueError(f"positive_phase must be one of {POSITIVE_PHASES}, got {positive_phase!r}")
        if isinstance(positive_sweeps, bool) or not isinstance(positive_sweeps, int) or positive_sweeps < 1:
            raise ValueError(f"positive_sweeps must be a positive int, got {positive_sweeps!r}")
        self.positive_phase, self.positive_sweeps = positive_phase, positive_sweeps
        self.sparsity_cost, self.sparsity_target = check_sparsity(sparsity_cost, sparsity_target, len(g.hidden))
        self._sparsity_batch: dict | None = None  # the latest positive phase's clamped layers
        self.layer_graph, self.init_scale, self.mean_field_steps = g, float(init_scale), mean_field_steps
        self.pretrain_epochs, self.pretrained = pretrain_epochs, False
        self.layers = list(g.layers)
        self.index = {name: i for i, name in enumerate(self.layers)}
        self.units = [g.units(n) for n in self.layers]
        self.is_visible = [g.is_visible(n) for n in self.layers]
        self.visible_index = [self.index[n] for n in g.visible]
        self.colour = [g.colour(n) for n in self.layers]
        self.edge_index = [(self.index[a], self.index[b]) for a, b in g.edges]
        sizes = [g.size(n) for n in self.layers]
        self.sizes = sizes
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(s)) for s in sizes])
        self.weights = nn.ParameterList(
            [nn.Parameter(init_scale * torch.randn(sizes[a], sizes[b])) for a, b in self.edge_index]
        )
        self.register_buffer("log_sigma", torch.zeros(max(sizes)))
        self.chains: tuple | None = None  # every layer of the last negative phase's persistent chains
        supports = {SUPPORT_OF_UNITS[self.units[i]] for i in self.visible_index}
        self.support = supports.pop() if len(supports) == 1 else "real"

    @classmethod
    def from_data(cls, data, hidden_units=(128, 64), **kwargs):
        """A chain ``[columns, *hidden_units]``, or ``graph=`` (networkx, node-link dict or .json path)
        whose first visible layer must match the data's columns."""
        if kwargs.get("graph") is not None:
            obj = cls(**kwargs)
            _check_visible_size(obj.sizes[obj.visible_index[0]], data)
            return obj
        return cls(sizes=[int(data.x.shape[1]), *hidden_units], **kwargs)

    # -- energy -----------------------------------------------------------------------------
    def energy_graph(self) -> LayeredEnergy:
        sigmas = [self.log_sigma[:s] if u == "gaussian" else None for s, u in zip(self.sizes, self.units)]
        return LayeredEnergy(
            list(self.layers),
            list(self.units),
            list(self.is_visible),
            list(self.biases),
            [(a, b, W) for (a, b), W in zip(self.edge_index, self.weights)],
            sigmas,
        )

    def data_args(self, dataset) -> tuple:
        return (self.check_data(dataset.x, "x"),)

    def check_data(self, data, name: str = "data"):
        """One tensor per visible layer (a tuple in :attr:`visible_layers` order when there are
        several), or a single tensor for the first visible layer alone, the others then being
        unobserved (summed out or inferred like hidden layers). Integer class labels on a softmax
        layer become one-hot rows."""
        parts = tuple(data) if isinstance(data, (tuple, list)) else (data,)
        if isinstance(data, (tuple, list)) and len(parts) != len(self.visible_index):
            raise ValueError(
                f"{name}: expected {len(self.visible_index)} tensor(s), one per visible layer "
                f"{self.visible_layers}, got {len(parts)}"
            )
        out = []
        for part, i in zip(parts, self.visible_index):
            label = f"{name}[{self.layers[i]}]"
            if self.units[i] == "softmax" and isinstance(part, torch.Tensor) and part.dim() == 1:
                if part.is_floating_point() or part.min() < 0 or part.max() >= self.sizes[i]:
                    raise ValueError(
                        f"{label}: expected integer class labels in [0, {self.sizes[i]}), got "
                        f"dtype {part.dtype}, range [{part.min()}, {part.max()}]"
                    )
                part = F.one_hot(part.long(), self.sizes[i])
            x = check_data(part, label, support=SUPPORT_OF_UNITS[self.units[i]], rank=2)
            if x.shape[1] != self.sizes[i]:
                raise ValueError(
                    f"{label}: expected {self.sizes[i]} columns (the layer's size), got shape {tuple(x.shape)}"
                )
            if self.units[i] == "softmax" and not (x.sum(-1) == 1).all():
                raise ValueError(
                    f"{label}: a DBM's softmax layer takes one-hot rows, got row sums {x.sum(-1).unique()[:5].tolist()}"
                )
            out.append(x.to(dtype=self.biases[0].dtype))  # the device stays the data's
        if len({x.shape[0] for x in out}) != 1:
            raise ValueError(
                f"{name}: the visible layers' tensors have different numbers of rows: {[tuple(x.shape) for x in out]}"
            )
        return tuple(out) if isinstance(data, (tuple, list)) else out[0]

    def _input(self, data, name: str = "data"):
        """Validated data on the model's device, for the model's own methods."""
        x = self.check_data(data, name)
        device = self.biases[0].device
        return tuple(t.to(device) for t in x) if isinstance(x, tuple) else x.to(device)

    @property
    def visible_layers(self) -> list[str]:
        return [self.layers[i] for i in self.visible_index]

    def _clamp(self, batch) -> dict:
        parts = batch if isinstance(batch, (tuple, list)) else (batch,)
        return dict(zip(self.visible_index, parts))

    # -- mean field -------------------------------------------------------------------------
    def mean_field(self, clamped: dict, steps: int | None = None) -> dict:
        """Mean-field means of every unclamped layer given ``clamped = {layer index: values}``.

        Initialized by one pass outward from the clamped layers, doubling the input of layers
        whose other neighbours are still unknown (they would otherwise miss half their input)."""
        e = self.energy_graph()
        mu = dict(clamped)
        free = [i for i in range(len(self.layers)) if i not in clamped]
        n = next(iter(clamped.values())).shape[0]
        for i in free:
            known = {j: mu[j] for j in e.neighbours(i) if j in mu}
            if known:
                scale = 2.0 if len(known) < len(e.neighbours(i)) else 1.0
                eta = e.natural(i, scale * e.input(i, known))
            else:
                eta = e.natural(
                    i, torch.zeros(n, self.sizes[i], dtype=self.biases[i].dtype, device=self.biases[i].device)
                )
            mu[i] = e.mean(i, eta)
        for _ in range(steps or self.mean_field_steps):
            for colour in (1, 0):
                for i in free:
                    if self.colour[i] == colour:
                        mu[i] = e.mean(i, e.natural(i, e.input(i, mu)))
        return mu

    def _entropy(self, mu: dict, free) -> torch.Tensor:
        total = torch.zeros(())
        for i in free:
            m = mu[i].clamp(1e-7, 1 - 1e-7)
            if self.units[i] == "bernoulli":
                total = total - (m * m.log() + (1 - m) * (1 - m).log()).sum(-1)
            elif self.units[i] == "softmax":
                total = total - (m * m.log()).sum(-1)
            else:
                raise ValueError("mean-field entropy of gaussian units is not defined here; clamp them")
        return total

    def variational_bound(self, batch, steps: int | None = None) -> torch.Tensor:
        """``E_q[-E(v, h)] + H(q)`` per point, ``q`` the mean-field posterior (held fixed for gradients)."""
        clamped = self._clamp(batch)
        with torch.no_grad():
            mu = self.mean_field(clamped, steps)
        free = [i for i in range(len(self.layers)) if i not in clamped]
        state = {i: (v if i in clamped else v.detach()) for i, v in mu.items()}
        return self.energy_graph().log_density(state) + self._entropy(state, free)

    # -- persistent-CD protocol -------------------------------------------------------------
    def prepare(self, data) -> None:
        """Greedy layer-wise pretraining for ``pretrain_epochs`` before persistent CD starts, unless
        :meth:`pretrain` ran already: a DBM from small random weights trains to a worse likelihood
        than the RBM of its first layer (Salakhutdinov & Hinton 2009). Graphs that are not trees of
        pathways (see :meth:`pretrain`) start from their random weights."""
        if self.pretrain_epochs and not self.pretrained and self._is_pathway_tree():
            self.pretrain(data, epochs=self.pretrain_epochs, lr=0.05, batch_size=50)

    def _is_pathway_tree(self) -> bool:
        try:
            self._pathways()
        except ValueError:
            return False
        return True

    def positive_log_density(self, batch):
        """The positive phase: :meth:`collapsed_log_density` at a posterior draw (``"gibbs"``) or
        the mean-field bound (``"mean-field"``); see ``positive_phase``."""
        clamped = self._clamp(batch)
        if self.sparsity_cost:
            self._sparsity_batch = clamped
        if self.positive_phase == "mean-field":
            return self.variational_bound(batch)
        summed, drawn = self._collapsed_split(clamped)
        with torch.no_grad():
            state = self.posterior_draws(clamped, self.positive_sweeps)
        return self.collapsed_log_density({i: state[i] for i in (*clamped, *drawn)}, summed)

    def regularizer(self) -> torch.Tensor:
        """The sparsity penalty (:func:`ppdgm.boltzmann.sparsity_penalty`) on the latest positive
        batch, each hidden layer's activations one mean-field update from the batch's mean-field
        state, so that its gradient reaches the layer's bias and incoming weights; 0 without one."""
        clamped, self._sparsity_batch = self._sparsity_batch, None
        if not self.sparsity_cost or clamped is None:
            return self.biases[0].new_zeros(())
        e = self.energy_graph()
        with torch.no_grad():
            mu = self.mean_field(clamped)
        hidden = [i for i in range(len(self.layers)) if not self.is_visible[i]]
        means = [e.mean(i, e.natural(i, e.input(i, mu))) for i in hidden]
        return sparsity_penalty(self.sparsity_cost, means, self.sparsity_target)

    def negative_log_density(self, state):
        """``-E`` on the persistent chains, which are kept (a reference) for :meth:`sample`."""
        self.chains = tuple(state)
        return self.energy_graph().log_density(dict(enumerate(state)))

    def get_extra_state(self) -> dict:
        return {"chains": [x.detach().clone() for x in self.chains] if self.chains is not None else []}

    def set_extra_state(self, state) -> None:
        """Restores the kept chains; a state without them (saved before they were kept) leaves none."""
        chains = state.get("chains") if isinstance(state, dict) else None
        if not chains:
            self.chains = None
            return
        shapes = [tuple(x.shape[1:]) for x in chains]
        if len(chains) != len(self.layers) or shapes != [(s,) for s in self.sizes]:
            raise ValueError(
                f"chains: expected one (num_chains, size) tensor per layer of sizes {self.sizes}, got {shapes}"
            )
        ref = self.biases[0]
        self.chains = tuple(x.to(ref) for x in chains)

    def chain_energy(self, state):
        return -self.negative_log_density(state)

    @torch.no_grad()
    def init_chains(self, num_chains: int, data):
        """Chains start at training points (drawn with replacement) with hidden layers sampled
        from their mean-field posterior."""
        parts = data if isinstance(data, (tuple, list)) else (data,)
        idx = torch.randint(0, parts[0].shape[0], (num_chains,), device=parts[0].device)
        return self.posterior_draws(self._clamp(tuple(p[idx] for p in parts)), 0)

    @torch.no_grad()
    def sample_chains(self, state, steps: int, clamped: dict | None = None):
        """``steps`` sweeps of block Gibbs (odd colour, then even), leaving ``clamped`` layers fixed."""
        e = self.energy_graph()
        state = dict(enumerate(state))
        for _ in range(steps):
            for colour in (1, 0):
                for i in range(len(self.layers)):
                    if self.colour[i] == colour and not (clamped and i in clamped):
                        state[i] = e.sample(i, e.natural(i, e.input(i, state)))
        return tuple(state[i] for i in range(len(self.layers)))

    # -- Pyro program -----------------------------------------------------------------------
    def _prior(self, i):
        size, ref = self.sizes[i], self.biases[i]
        if self.units[i] == "bernoulli":
            return dist.Bernoulli(ref.new_full((size,), 0.5)).to_event(1)
        if self.units[i] == "softmax":
            return dist.OneHotCategorical(logits=ref.new_zeros(size))
        return dist.ImproperUniform(constraints.real, (), (size,))

    def model(self, *visible, n: int | None = None):
        """Uniform priors on every layer times ``exp(-E)``: the DBM's unnormalized joint."""
        n = visible[0].shape[0] if visible else n
        obs = dict(zip(self.visible_index, visible))
        with pyro.plate("data", n):
            state = {i: pyro.sample(name, self._prior(i), obs=obs.get(i)) for i, name in enumerate(self.layers)}
            pyro.factor("energy", self.energy_graph().log_density(state))

    def guide(self, *visible, n: int | None = None):
        """The mean-field posterior of the hidden layers given the visible ones."""
        mu = self.mean_field(dict(zip(self.visible_index, visible)))
        with pyro.plate("data", visible[0].shape[0]):
            for i, name in enumerate(self.layers):
                if i not in self.visible_index:
                    pyro.sample(name, dist.Bernoulli(mu[i].clamp(1e-6, 1 - 1e-6)).to_event(1))

    # -- use --------------------------------------------------------------------------------
    @torch.no_grad()
    def transform(self, data) -> torch.Tensor:
        """Mean-field means of all hidden layers, concatenated (features for classifiers)."""
        clamped = self._clamp(self._input(data))
        mu = self.mean_field(clamped)
        return torch.cat([mu[i] for i in range(len(self.layers)) if not self.is_visible[i]], -1)

    @torch.no_grad()
    def complete(
        self, observed: dict, steps: int | None = None, method: str = "mean-field", num_samples: int = 100
    ) -> dict:
        """Fill in the missing visible layers: ``{name: tensor}`` in, ``{missing name: mean}`` out
        (a softmax label layer's mean is P(y | observed)).

        ``method="mean-field"``: clamped mean-field after ``steps`` sweeps (default 30), fast and
        deterministic, the classifier's read-out; but a fixed point of mean-field is one mode of
        the conditional, so pixels filled in from a label can settle on another digit's mode.
        ``method="gibbs"`` (use it to draw a modality from a label): the conditional mean
        ``E[x | observed]`` under the model, averaged over ``num_samples`` block-Gibbs chains per row
        with the observed layers clamped, ``steps`` sweeps (default 300) from the mean-field state,
        each sweep of the second half contributing the layer's mean given its neighbours; it costs
        ``num_samples * steps`` sweeps per row."""
        if not isinstance(observed, dict) or not observed:
            raise TypeError(f"observed: expected a non-empty dict {{visible layer name: tensor}}, got {observed!r}")
        if method not in ("gibbs", "mean-field"):
            raise ValueError(f"method must be 'gibbs' or 'mean-field', got {method!r}")
        for arg, val in (("steps", steps), ("num_samples", num_samples)):
            if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 1):
                raise ValueError(f"{arg} must be a positive int, got {val!r}")
        clamped = {}
        for name, x in observed.items():
            if name not in self.visible_layers:
                raise ValueError(
                    f"observed: {name!r} is not a visible layer; expected names from {self.visible_layers}"
                )
            i = self.index[name]
            label = f"observed[{name}]"
            x = check_data(x, label, support=SUPPORT_OF_UNITS[self.units[i]], rank=2)
            if x.shape[1] != self.sizes[i]:
                raise ValueError(f"{label}: expected {self.sizes[i]} columns, got shape {tuple(x.shape)}")
            clamped[i] = x.to(self.biases[0].device, self.biases[0].dtype)
        missing = [i for i in self.visible_index if i not in clamped]
        if method == "mean-field":
            mu = self.mean_field(clamped, steps or 30)
            return {self.layers[i]: mu[i] for i in missing}
        means = self._gibbs_means(clamped, missing, steps or 300, num_samples)
        return {self.layers[i]: m for i, m in zip(missing, means)}

    def _gibbs_means(self, clamped: dict, layers: list, steps: int, num_samples: int) -> list:
        """Rao-Blackwellized means of ``layers`` over clamped block-Gibbs chains, ``num_samples`` per row."""
        n = next(iter(clamped.values())).shape[0]
        rows = {i: x.repeat(num_samples, 1) for i, x in clamped.items()}
        e = self.energy_graph()
        burn_in = steps // 2
        state = self.posterior_draws(rows, burn_in)
        totals = [torch.zeros_like(state[i]) for i in layers]
        for _ in range(steps - burn_in):
            state = self.sample_chains(state, 1, clamped=rows)
            current = dict(enumerate(state))
            for total, i in zip(totals, layers):
                total.add_(e.mean(i, e.natural(i, e.input(i, current))))
        return [(t / (steps - burn_in)).reshape(num_samples, n, -1).mean(0) for t in totals]

    @torch.no_grad()
    def sample(self, n: int, steps: int | None = None, from_chains: bool = True):
        """``n`` visible draws (a tuple over visible layers when there are several).

        A trained DBM continues its kept persistent chains (:attr:`chains`, saved with the module):
        ``n`` of them in random order (cycled when ``n`` is larger), ``steps`` (default 10) sweeps of
        block Gibbs. They are spread over the model's modes already: on digits (a DBM trained with
        weight decay 3e-4) their draws score as 1000 sweeps from noise do (Fréchet distance 3.7x
        against 3.6x the held-out floor, 3 sampling seeds) at a hundredth of the cost. Without kept
        chains or with ``from_chains=False``: ``steps`` (default 1000) sweeps from uniform states."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            raise ValueError(f"steps must be a non-negative int or None, got {steps!r}")
        if not isinstance(from_chains, bool):
            raise TypeError(f"from_chains must be a bool, got {from_chains!r}")
        if from_chains and self.chains is not None:
            pick = cycled_rows(n, self.chains[0].shape[0], self.chains[0].device)
            state = tuple(x[pick].to(self.biases[0]) for x in self.chains)  # on the model's device
            steps = 10 if steps is None else steps
        else:
            e = self.energy_graph()
            state = tuple(
                _draw(
                    e,
                    i,
                    self.biases[i].new_full(
                        (n, self.sizes[i]), 0.5 if self.units[i] == "bernoulli" else 1.0 / self.sizes[i]
                    ),
                )
                for i in range(len(self.layers))
            )
            steps = 1000 if steps is None else steps
        state = self.sample_chains(state, steps)
        out = tuple(state[i] for i in self.visible_index)
        return out if len(out) > 1 else out[0]

    @torch.no_grad()
    def log_partition(self, method: str = "ais", base_data=None, **ais_kwargs):
        from ppdgm.ais import annealed_importance_sampling, exact_log_partition

        if method == "exact":
            return exact_log_partition(self.energy_graph())
        if method != "ais":
            raise ValueError(f"method must be 'ais' or 'exact', got {method!r}")
        base = None if base_data is None else self._clamp(self._input(base_data, "base_data"))
        return annealed_importance_sampling(self.energy_graph(), base_data=base, **ais_kwargs)

    @torch.no_grad()
    def log_likelihood(
        self, data, method: str = "ais", base_data=None, num_samples: int = 100, **ais_kwargs
    ) -> torch.Tensor:
        """Per-point lower bound on ``log p(v)`` in nats, ``log Z`` by AIS or exact enumeration
        (kept as ``self.last_log_z``).

        The unobserved layers of one Gibbs colour are summed out in closed form and those of the
        other are importance-sampled from the mean-field posterior (:meth:`importance_bound`):
        ``log mean_s p*(v, h^s) / q(h^s)`` over ``num_samples`` draws, a bound in expectation that
        is much tighter than mean-field's (Salakhutdinov & Hinton 2009). When the sampled layers
        hold gaussian units it is the mean-field bound ``E_q[-E] + H(q) - log Z``."""
        data = self._input(data)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if method == "ais":
            self.last_log_z = self.log_partition(
                "ais", base_data=data if base_data is None else base_data, **ais_kwargs
            )
        else:
            self.last_log_z = self.log_partition(method)
        bound = self.importance_bound(data, num_samples)
        if bound is None:
            bound = self.variational_bound(data, steps=max(30, self.mean_field_steps))
        return bound - self.last_log_z.value

    def _collapsed_split(self, clamped: dict) -> tuple[list, list]:
        """``(summed, drawn)``: the unclamped layers of the Gibbs colour with more units, summed out
        in closed form given the rest, and the unclamped layers of the other colour."""
        free = [[i for i in range(len(self.layers)) if self.colour[i] == c and i not in clamped] for c in (0, 1)]
        summed, drawn = sorted(free, key=lambda b: -sum(self.sizes[i] for i in b))
        return summed, drawn

    def collapsed_log_density(self, state: dict, summed) -> torch.Tensor:
        """``log sum_{summed} exp(-E)``: the unnormalized log-density of the layers in ``state`` with
        the ``summed`` layers (one colour, so independent given the rest) summed out in closed form."""
        e = self.energy_graph()
        log_p = sum((e.own_log_density(i, x) for i, x in state.items()), torch.zeros(()))
        for a, b, W in e.edges:  # clamped and drawn layers of different colours touch
            if a in state and b in state:
                log_p = log_p + ((e.scaled(a, state[a]) @ W) * e.scaled(b, state[b])).sum(-1)
        for j in summed:
            log_p = log_p + e.log_marginal(j, e.natural(j, e.input(j, state)))
        return log_p

    @torch.no_grad()
    def posterior_draws(self, clamped: dict, sweeps: int) -> tuple:
        """Every layer (a chain state) after ``sweeps`` sweeps of block Gibbs with ``clamped``
        fixed, started from a draw of the mean-field posterior: approximately a draw of
        p(h | clamped). It starts persistent chains, clamped Gibbs means and the positive phase."""
        e = self.energy_graph()
        mu = self.mean_field(clamped)
        state = tuple(clamped[i] if i in clamped else _draw(e, i, mu[i]) for i in range(len(self.layers)))
        return self.sample_chains(state, sweeps, clamped=clamped)

    @torch.no_grad()
    def importance_bound(self, data, num_samples: int = 100):
        """``log mean_s p*(v, h^s) / q(h^s)`` per point: the unclamped layers of one Gibbs colour
        are summed out in closed form (:meth:`collapsed_log_density`) and those of the other are
        drawn from the clamped mean-field posterior ``q``. A bound in expectation that tends to
        ``log p*(v)`` as ``num_samples`` grows. None when the drawn layers include gaussian units
        (mean-field ``q`` is not a density over them)."""
        clamped = self._clamp(data)
        summed, drawn = self._collapsed_split(clamped)
        if any(self.units[i] == "gaussian" for i in drawn):
            return None
        mu = self.mean_field(clamped, max(30, self.mean_field_steps))
        e = self.energy_graph()
        n = next(iter(clamped.values())).shape[0]
        state = {i: x.repeat(num_samples, 1) for i, x in clamped.items()}
        log_q = 0.0
        for i in drawn:
            p = mu[i].repeat(num_samples, 1).clamp(1e-6, 1 - 1e-6)
            state[i] = _draw(e, i, p)
            log_q = log_q + (state[i] * p.log()).sum(-1)
            if self.units[i] == "bernoulli":
                log_q = log_q + ((1 - state[i]) * (1 - p).log()).sum(-1)
        log_w = (self.collapsed_log_density(state, summed) - log_q).reshape(num_samples, n)
        return torch.logsumexp(log_w, 0) - math.log(num_samples)

    # -- greedy pretraining -----------------------------------------------------------------
    @torch.no_grad()
    def pretrain(
        self,
        data,
        epochs: int = 20,
        lr: float = 0.05,
        batch_size: int = 100,
        momentum: float = 0.5,
        seed: int | None = 0,
    ) -> list[float]:
        """Greedy layer-wise CD-1 pretraining (Salakhutdinov & Hinton 2009), for tree-shaped graphs
        whose pathways run from each visible layer up to one top layer (a chain DBM, a multimodal DBM).

        Each pathway's RBMs are trained bottom-up on the layer below's mean activations, then the
        top RBM on all its neighbours at once. In every RBM a layer's input is multiplied by its
        number of neighbours in the DBM over its number in that RBM (2 for a middle layer seen
        from one side), the doubled weights that make the pretrained stack a sensible DBM.
        Returns each RBM's final reconstruction error per data point."""
        for arg, val in (("epochs", epochs), ("batch_size", batch_size)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{arg} must be a positive int, got {val!r}")
        top, pathways = self._pathways()
        clamped = self._clamp(self._input(data))
        gen = torch.Generator().manual_seed(seed or 0)
        errors, reps = [], {}
        degree = {i: len(self.energy_graph().neighbours(i)) for i in range(len(self.layers))}
        for path in pathways:
            x = clamped[path[0]]
            for lower, upper in itertools.pairwise(path):
                part = _Part(x, self._weight(lower, upper), self.biases[lower], self.units[lower], degree[lower] / 1.0)
                errors.append(
                    _cd_pretrain([part], self.biases[upper], degree[upper] / 1.0, epochs, lr, batch_size, momentum, gen)
                )
                x = torch.sigmoid(degree[upper] * (x @ part.W) + self.biases[upper])
            reps[path[-1]] = x
        parts = [_Part(reps[n], self._weight(n, top), self.biases[n], self.units[n], degree[n] / 1.0) for n in reps]
        errors.append(
            _cd_pretrain(parts, self.biases[top], degree[top] / len(parts), epochs, lr, batch_size, momentum, gen)
        )
        self.pretrained = True
        return errors

    def _weight(self, lower: int, upper: int) -> torch.Tensor:
        """The weight between two layers, shaped ``(lower size, upper size)`` (a transposed view if stored so)."""
        for (a, b), W in zip(self.edge_index, self.weights):
            if (a, b) == (lower, upper):
                return W
            if (a, b) == (upper, lower):
                return W.T
        raise KeyError((lower, upper))

    def _pathways(self):
        """``(top, [[visible, ..., neighbour of top], ...])``; ValueError unless the graph is a tree of pathways."""
        import networkx as nx

        g = self.layer_graph
        und = g.graph
        top = und.graph.get("top", g.layers[-1] if g.is_chain else None)
        if top is None or top not in self.index or not nx.is_tree(und):
            raise ValueError(
                "pretrain: greedy pretraining needs a tree of pathways meeting at a top layer (a chain, "
                "or a graph whose graph['top'] names the shared layer, as multimodal_graph sets); got "
                f"{g}"
            )
        rest = und.subgraph([n for n in und if n != top])
        paths = []
        for n in und.neighbors(top):
            comp = nx.node_connected_component(rest, n)
            vis = [v for v in comp if g.is_visible(v)]
            if len(vis) != 1 or any(d > 2 for _, d in rest.subgraph(comp).degree()):
                raise ValueError(f"pretrain: the pathway below {n!r} must be a chain ending in one visible layer")
            paths.append([self.index[v] for v in nx.shortest_path(rest, vis[0], n)])
        return self.index[top], paths


def _check_visible_size(size: int, data) -> None:
    if size != data.x.shape[1]:
        raise ValueError(
            f"graph: the first visible layer has {size} units but {data.name} has {data.x.shape[1]} columns"
        )


class _Part:
    """One input layer of an RBM being pretrained: data, weight (input size x hidden size), bias,
    units and the multiplier of the input it receives from the hidden layer."""

    def __init__(self, x, W, b, units, down):
        self.x, self.W, self.b, self.units, self.down = x, W, b, units, down


def _draw(e: LayeredEnergy, i: int, mean: torch.Tensor) -> torch.Tensor:
    if e.units[i] == "bernoulli":
        return bernoulli(mean)
    if e.units[i] == "softmax":
        return F.one_hot(torch.multinomial(mean, 1).squeeze(-1), mean.shape[-1]).to(mean.dtype)
    return mean.clone()


def _cd_pretrain(parts, c, up, epochs, lr, batch_size, momentum, gen) -> float:
    """CD-1 on one RBM of the stack: ``parts`` feed hidden layer (bias ``c``) with multiplier ``up``."""
    n = parts[0].x.shape[0]
    params = [c] + [t for p in parts for t in (p.W, p.b)]
    vel = [torch.zeros_like(t) for t in params]
    err = math.nan
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(c.device)
        total = 0.0
        for lo in range(0, n, batch_size):
            idx = perm[lo : lo + batch_size]
            v0 = [p.x[idx] for p in parts]
            h0 = torch.sigmoid(up * sum(v @ p.W for v, p in zip(v0, parts)) + c)
            hs = bernoulli(h0)
            v1 = []
            for p in parts:
                eta = p.down * (hs @ p.W.T) + p.b
                v1.append(torch.sigmoid(eta) if p.units == "bernoulli" else torch.softmax(eta, -1))
            h1 = torch.sigmoid(up * sum(v @ p.W for v, p in zip(v1, parts)) + c)
            m = len(idx)
            grads = [(h0 - h1).mean(0)]
            for a, b in zip(v0, v1):
                grads += [(a.T @ h0 - b.T @ h1) / m, (a - b).mean(0)]
            for t, g, v in zip(params, grads, vel):
                v.mul_(momentum).add_(g, alpha=lr)
                t.add_(v)
            total += sum(float(((a - b) ** 2).sum()) for a, b in zip(v0, v1))
        err = total / n
    return err


class MultimodalDBM(DBM):
    """Digit pixels and a one-hot label joined at a shared top (``graph`` overrides the default
    ``pixels -- pixels_h1 -- top -- label``)."""

    datasets = ("digits-binary",)

    # the settings its labelling test measures (40 epochs of 50, 100 chains, seeds 0-2: label
    # accuracy 0.896, 0.902, 0.906; 0.899, 0.892, 0.892 at 20 epochs, 0.889-0.892 at k=5 and
    # 0.875-0.902 with the mean-field positive phase); at lr 3e-4 the joint stays near the
    # pretrained one, whose pixels drawn given a label are often another digit's
    engine_config: ClassVar[dict] = {"optim": "adam", "lr": 3e-3, "lr_schedule": "linear", "k": 10}

    def __init__(
        self,
        graph=None,
        features: int = 64,
        hidden_units: int = 128,
        top_units: int = 64,
        classes: int = 10,
        init_scale: float = 0.01,
        mean_field_steps: int = 10,
        pretrain_epochs: int = 30,
        positive_phase: str = "gibbs",
        positive_sweeps: int = 1,
    ):
        if graph is None:
            graph = multimodal_graph([features, hidden_units], [classes], top_units).graph
        super().__init__(
            graph=graph,
            init_scale=init_scale,
            mean_field_steps=mean_field_steps,
            pretrain_epochs=pretrain_epochs,
            positive_phase=positive_phase,
            positive_sweeps=positive_sweeps,
        )
        if len(self.visible_index) != 2:
            raise ValueError(f"graph: a multimodal DBM has two visible layers, got {self.visible_layers}")

    # sized by the data's columns and classes, not by a chain of hidden_units as DBM.from_data
    @classmethod
    def from_data(cls, data, **kwargs):  # type: ignore[override]
        if data.y is None:
            raise ValueError(f"{data.name}: a multimodal DBM needs labels (dataset.y), got None")
        if kwargs.get("graph") is not None:
            obj = cls(**kwargs)
            _check_visible_size(obj.sizes[obj.visible_index[0]], data)
            return obj
        return cls(features=int(data.x.shape[1]), classes=int(data.y.max()) + 1, **kwargs)

    def data_args(self, dataset) -> tuple:
        """Both modalities: the pixels and the labels (one-hot rows of the softmax layer)."""
        if dataset.y is None:
            raise ValueError(f"{dataset.name}: a multimodal DBM needs labels (dataset.y), got None")
        return self.check_data((dataset.x, dataset.y), "data")

    @torch.no_grad()
    def sample(self, n: int, steps: int | None = None, from_chains: bool = True) -> torch.Tensor:
        """Draws of the first modality (the pixels); :meth:`sample_all` returns both."""
        return self.sample_all(n, steps, from_chains)[0]

    def sample_all(self, n: int, steps: int | None = None, from_chains: bool = True) -> tuple:
        """Joint draws of both visible layers, as :meth:`DBM.sample` draws them."""
        return DBM.sample(self, n, steps, from_chains)

    def predict(self, x, steps: int = 30) -> torch.Tensor:
        """The most probable label of each row of the first modality (a generative classifier)."""
        first, second = self.visible_layers
        return self.complete({first: x}, steps, method="mean-field")[second].argmax(-1)
