"""The written interface of a zoo family, and the small protocols an engine may ask a family for.

A family is what ``ppdgm.models.MODELS`` registers: a class (usually a ``PyroModule``) that the
command line and :mod:`ppdgm.families` build from data, hand to an engine, save, rebuild, score
in nats and sample from. Everything here is a ``typing.Protocol``: families conform by having the
members, not by inheriting. The join between families and engines lives in one module,
:mod:`ppdgm.families`; no engine knows a family class and no caller probes attributes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from ppdgm.data import Dataset


@runtime_checkable
class Family(Protocol):
    """What every zoo family provides to be fitted, evaluated, sampled and saved.

    - ``default_engine``: the name (in ``ppdgm.inference.ENGINES``) of the engine it trains with.
    - ``engine_config``: settings that engine trains it well with (``{}`` when none); explicit
      options given by a user win over them.
    - ``datasets``: the bundled datasets (``ppdgm.data.DATASETS``) it suits, the quickest first;
      ``ppdgm list`` shows them and the command-line tests fit each family on the first.
    - ``support``: what its data must be (``"binary"``, ``"unit_interval"``, ``"real"`` ...), as
      :func:`ppdgm.data.check_data` understands it.
    - ``from_data(dataset, **kwargs)``: an instance sized from a :class:`ppdgm.data.Dataset`.
    - ``spec``: ``{"name": <registry name>, "kwargs": <constructor arguments>}``, enough to rebuild
      the family (weights come from the saved Fit); derived from the constructor's arguments.
    - ``data_args(dataset)``: the validated tensors its programs and engines take, in order.
    - ``log_likelihood(x, **options)``: held-out ``log p(x)`` in nats, one value per point.
    - ``sample(n)``: ``n`` draws of ``x``.
    """

    default_engine: ClassVar[str]
    engine_config: ClassVar[dict]
    datasets: ClassVar[tuple[str, ...]]
    support: str

    @classmethod
    def from_data(cls, dataset: Dataset, **kwargs: Any) -> Family: ...

    @property
    def spec(self) -> dict: ...

    def data_args(self, dataset: Dataset) -> tuple: ...

    def log_likelihood(self, x: torch.Tensor, **options: Any) -> torch.Tensor: ...

    def sample(self, n: int) -> torch.Tensor: ...


# ------------------------------------------------------------------------------------------------
# what particular engines ask of a family (each engine's ``input`` names which it takes)


@runtime_checkable
class PyroProgram(Protocol):
    """``input = "program"`` (SVI) and ``input = "posterior"`` (NUTS, HMC, ChEES): ``model(*data)``
    is a Pyro program; ``guide`` is its guide or None (an autoguide then)."""

    def model(self, *args: Any, **kwargs: Any) -> Any: ...

    guide: Any


@runtime_checkable
class PersistentChains(Protocol):
    """``input = "energy"`` (persistent CD): an unnormalized log-density and a sampler for it."""

    def positive_log_density(self, batch: torch.Tensor) -> torch.Tensor: ...

    def init_chains(self, num_chains: int, data: torch.Tensor) -> Any: ...

    def sample_chains(self, state: Any, steps: int) -> Any: ...

    def negative_log_density(self, state: Any) -> torch.Tensor: ...


@runtime_checkable
class Denoising(Protocol):
    """``input = "denoising"`` (score matching): a per-point denoising score-matching loss."""

    def denoising_loss(self, batch: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Adversarial(Protocol):
    """``input = "adversarial"``: a generator program ``model(n, *conditioning)`` recording its draws
    at a site, and a ``critic(x, *conditioning) -> logits`` module."""

    def model(self, n: int, *conditioning: torch.Tensor) -> Any: ...

    critic: torch.nn.Module


@runtime_checkable
class LayerStack(Protocol):
    """``input = "layers"`` (greedy layer-wise): a bottom-first ``stack`` of RBMs and ``up(x)``."""

    stack: Any

    def up(self, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class PredictsFromDraws(Protocol):
    """A family that predicts from posterior draws (the BNN) is given them after sampling."""

    def attach_posterior(self, samples: dict) -> None: ...
