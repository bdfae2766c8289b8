"""Where zoo families meet engines: build a family from data, make its engine, fit, evaluate.

This is the only module that knows both sides. It relies on what is written down, never on
probing: a family follows :class:`ppdgm.models.family.Family` and the engine protocol its engine
names in ``Engine.input`` (:mod:`ppdgm.inference.base`); an engine is configured by its
constructor's arguments. The command line calls these functions; so can a script.

Options that a training loop has but a sampler does not (``num_steps``, ``num_epochs``, ``lr``,
``batch_size``) are refused for sampler engines rather than mapped: a sampler's budget is its
``num_samples``/``num_warmup``, which a user sets by name (``--engine-opt num_samples=200``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from ppdgm.data import check_data
from ppdgm.inference import ENGINES, engine_class
from ppdgm.models import MODELS, model_class
from ppdgm.models.family import (
    Adversarial,
    Denoising,
    Family,
    LayerStack,
    PersistentChains,
    PredictsFromDraws,
    PyroProgram,
)

if TYPE_CHECKING:
    from ppdgm.data import Dataset
    from ppdgm.evaluate import NatsEstimate
    from ppdgm.fit import Fit, PathLike
    from ppdgm.inference.base import Engine

PROTOCOL_OF_INPUT = {
    "program": PyroProgram,
    "posterior": PyroProgram,
    "energy": PersistentChains,
    "denoising": Denoising,
    "adversarial": Adversarial,
    "layers": LayerStack,
}
"""The family protocol each engine input needs (``Engine.input`` -> ``ppdgm.models.family``)."""


@runtime_checkable
class ScoresInNats(Protocol):
    """A family with an exact or estimated ``log p(x)`` (an implicit model, the GAN, has none)."""

    def log_likelihood(self, x: torch.Tensor, **options: Any) -> torch.Tensor: ...


# ------------------------------------------------------------------------------------------------
# signatures


def parameters(fn: Callable) -> dict[str, inspect.Parameter]:
    """Named parameters of ``fn``, following ``**kwargs`` up a class's ``__init__`` chain."""
    if inspect.isclass(fn):
        found: dict[str, inspect.Parameter] = {}
        for klass in fn.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            params = inspect.signature(init).parameters
            found.update(
                {
                    k: p
                    for k, p in params.items()
                    if k != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and k not in found
                }
            )
            if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                break
        return found
    return {
        k: p for k, p in inspect.signature(fn).parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }


def family_keys(name: str) -> list[str]:
    """The keyword arguments ``--set`` accepts for a family: its constructor's and ``from_data``'s."""
    cls = model_class(name)
    keys = set(parameters(cls)) | (set(parameters(cls.from_data)) - {"data", "dataset"})
    return sorted(keys)


def engines_taking(option: str) -> list[str]:
    return [name for name in ENGINES if option in parameters(engine_class(name))]


def engines_for(cls: type[Family]) -> list[str]:
    """Engines that can run family class ``cls``, its default first: those taking the same input as
    its default engine, and, for a Pyro program, both the optimizers and the samplers of programs."""
    default = engine_class(cls.default_engine).input
    programs = ("program", "posterior")
    names = [cls.default_engine]
    for name in ENGINES:
        input_ = engine_class(name).input
        if name not in names and (input_ == default or (input_ in programs and default in programs)):
            names.append(name)
    return names


# ------------------------------------------------------------------------------------------------
# building


def build_family(name: str, dataset: Dataset, **kwargs: Any) -> Family:
    """The family ``name`` sized from ``dataset``, after checking ``kwargs`` names and the data's support.

    Unknown keys are refused with the valid ones listed, before anything is built.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)} or path/to/file.py:function")
    keys = family_keys(name)
    unknown = sorted(set(kwargs) - set(keys))
    if unknown:
        raise ValueError(f"{name} takes no argument(s) {unknown}; its arguments are {keys}")
    family = model_class(name).from_data(dataset, **kwargs)
    # the instance's support: options such as likelihood= change it
    check_data(dataset.x, f"data {dataset.name}", support=family.support)
    return family


def default_engine_config(family: Family) -> dict:
    """The settings the family trains well with on its default engine."""
    return dict(family.engine_config)


def make_engine(
    family: Family | None, engine_name: str | None, options: dict, *, explicit: dict | None = None
) -> Engine:
    """An engine configured by, in rising precedence: the family's ``engine_config`` (only for its
    default engine), ``options`` (the command line's generic flags, dropped where the engine does not
    take them when left unset), and ``explicit`` (options the user named: refused if not taken).

    ``options`` maps constructor names to values; ``None`` means "not given". Returns the engine.
    """
    engine_name = engine_name or (family.default_engine if family is not None else "svi")
    cls = engine_class(engine_name)
    taken = parameters(cls)
    given = {k: v for k, v in options.items() if v is not None}
    for key in {**given, **(explicit or {})}:
        if key not in taken:
            others = [n for n in engines_taking(key) if n != engine_name]
            hint = f"; engines that take it: {', '.join(others)}" if others else ""
            if cls.input == "posterior" and key in ("num_steps", "num_epochs", "lr", "batch_size"):
                hint += " (a sampler's budget is num_samples/num_warmup: --engine-opt num_samples=...)"
            raise ValueError(f"engine {engine_name!r} takes no option {key!r}{hint}")
    suggested = default_engine_config(family) if family is not None and engine_name == family.default_engine else {}
    suggested = {k: v for k, v in suggested.items() if k in taken}
    return cls(**{**suggested, **given, **(explicit or {})})


def check_can_fit(family: Family, engine: Engine) -> None:
    """Refuse a family/engine pair whose engine protocol the family does not implement."""
    protocol = PROTOCOL_OF_INPUT.get(engine.input)
    if protocol is None:
        raise ValueError(f"engine {engine.name!r} declares an unknown input {engine.input!r}")
    if not isinstance(family, protocol):
        raise ValueError(
            f"family {family.spec['name']} cannot be fit by engine {engine.name!r}: it does not "
            f"implement {protocol.__name__} (ppdgm.models.family)"
        )


def data_args(family: Family, dataset: Dataset) -> tuple:
    """The tensors the family's programs take, in order."""
    return tuple(family.data_args(dataset))


# ------------------------------------------------------------------------------------------------
# fitting


def fit_family(
    family: Any,
    engine: Engine,
    train: Dataset,
    valid: Dataset | None = None,
    checkpoint_dir: PathLike | None = None,
    resume: bool = False,
    callbacks: tuple | list = (),
) -> Fit:
    """Run ``engine`` on ``family`` with the datasets ``train``/``valid``; the Fit knows its family.

    ``family`` is a :class:`~ppdgm.models.family.Family` that implements the protocol of ``engine.input``
    (checked first), so it is typed by what the engine asks of it rather than as a ``Family``."""
    check_can_fit(family, engine)
    train_args = data_args(family, train)
    valid_args = data_args(family, valid) if valid is not None else None
    run = {"checkpoint_dir": checkpoint_dir, "resume": resume}
    if engine.input == "program":
        fit = engine.run(family.model, family.guide, train_args, val_data=valid_args, callbacks=callbacks, **run)
    elif engine.input == "posterior":
        fit = engine.run(family.model, *train_args, callbacks=callbacks, **run)
    elif engine.input == "adversarial":
        fit = engine.run(family.model, family.critic, train_args, val_data=valid_args, callbacks=callbacks, **run)
    else:  # energy, denoising, layers: the engine runs the module on the points
        fit = engine.run(family, _points(train_args), val_data=_points(valid_args), callbacks=callbacks, **run)
    fit.spec, fit.module = family.spec, family
    fit.args = fit.args or train_args  # the reports overlay the data (engines of modules keep none)
    fit.extra["num_points"] = {"train": len(train_args[0]), "valid": len(valid_args[0]) if valid_args else None}
    if isinstance(family, PredictsFromDraws):
        if not fit.samples and fit.guide is not None:
            # fit by SVI: the guide's draws stand in for a sampler's
            from ppdgm.diagnostics import guide_draws

            fit.samples = guide_draws(fit.model, fit.guide, fit.args, fit.kwargs, num_samples=200)
        if fit.samples:
            family.attach_posterior(dict(fit.samples))  # draws streamed to disk are read here
    return fit


def _points(args: tuple | None) -> torch.Tensor | tuple | None:
    """One tensor stays one tensor; several (a multimodal DBM's parts) go as a tuple."""
    if args is None:
        return None
    return args[0] if len(args) == 1 else tuple(args)


# ------------------------------------------------------------------------------------------------
# evaluating


def evaluate_family(family: Family, dataset: Dataset, **options: Any) -> NatsEstimate | dict[str, float | None]:
    """Held-out ``log p(x)`` in nats (a :class:`ppdgm.evaluate.NatsEstimate`) or, for a family
    without a likelihood, sample quality against the data (MMD, precision/recall, Fréchet)."""
    from ppdgm.evaluate import log_likelihood, sample_quality

    args = data_args(family, dataset)
    if not isinstance(family, ScoresInNats):
        with torch.no_grad():
            fake = family.sample(len(args[0]))
        return {
            k: round(float(v), 4) if v is not None else None
            for k, v in sample_quality(args[0], fake.reshape(len(fake), -1), **options).items()
        }
    # the further tensors of data_args (a BNN's targets, a forecaster's start times) go by name
    # (parameters that default to None; estimator options such as method= have real defaults)
    names = []
    for k, p in list(parameters(family.log_likelihood).items())[1:]:
        if p.default not in (None, p.empty):
            break
        names.append(k)
    options.update({k: v for k, v in zip(names, args[1:]) if k not in options})
    return log_likelihood(family, args[0], **options)
