"""The result of running an engine: trained parameters or draws, history, timing, config.

A Fit saves to a folder of plain files: ``fit.json`` (engine, config, history, timing, model
spec) and ``tensors.pt`` (parameters, draws; draws streamed to disk stay chunk files, in
``draws/``), written atomically and read back with
``torch.load(weights_only=True)`` so a crafted file cannot run code.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch
from torch.distributions import constraints

# what a file or folder argument may be, and where tensors may be put
PathLike = str | os.PathLike[str]
Device = str | torch.device | None

FIT_FILE = "fit.json"
TENSORS_FILE = "tensors.pt"
DRAWS_FOLDER = "draws"  # chunk files of streamed draws (LazyDraws)


# ---------------------------------------------------------------------------------------------
# files


def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` to a temp file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(text: str, path: PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def safe_load(path: PathLike, map_location: Any = None, mmap: bool = False) -> Any:
    """Load tensors/containers only; anything that would unpickle code is refused with ValueError,
    and an empty, truncated or otherwise unreadable file is reported as such (also a ValueError).
    ``mmap=True`` maps the tensors' bytes instead of reading them: only what is used is read."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty (truncated: the write that made it did not finish)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err):
            raise ValueError(
                f"{path}: refused to load: it holds objects other than tensors and plain containers "
                f"(loading uses weights_only=True so a crafted file cannot run code): {str(err).splitlines()[0]}"
            ) from None
        raise ValueError(f"{path}: the file is corrupt ({str(err).splitlines()[0]})") from None
    except (EOFError, RuntimeError, OSError, KeyError, ValueError, AttributeError, TypeError) as err:
        detail = str(err).splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{path}: the file is truncated or corrupt, not a complete torch.save file ({detail})"
        ) from None


def check_writable(directory: PathLike, what: str = "output folder") -> Path:
    """Make ``directory`` (if needed) and prove a file can be written in it, before any work.

    Raises ValueError naming the folder and the reason: an existing file in its place, no
    permission, a read-only or full file system.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{what} {directory} is an existing file, not a folder")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".ppdgm-write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"{what} {directory} is not writable: {err.strerror or err}") from None
    return directory


class UntrustedCodeError(ValueError):
    """Opening a saved fit would run a Python file it names; the caller has not opted in."""


# ---------------------------------------------------------------------------------------------
# draws kept on disk in chunk files, read on access
#
# A sampler streaming its draws to disk (``Sampler.stream_draws``) writes one file per chunk,
# ``chunk-<first chain>-<first draw>.pt``, each ``{"samples": {site: (chains, draws, ...)},
# "stats": {stat: (chains, draws)}}`` for a block of chains and consecutive draws. The Fit holds
# :class:`LazyDraws`, which reads a name's chunks (memory-mapped: only that name's bytes) and puts
# them together when it is asked for that name; ``Fit.save`` copies the files into ``draws/``.

DRAW_GROUPS = ("samples", "stats")


class DrawFiles:
    """A folder of chunk files holding ``num_chains`` x ``num_samples`` draws, and their index.

    ``chunks`` lists ``{"file", "chains": [first, width], "draws": [first, count]}``; ``names``
    the names in each group (as written by the first chunk)."""

    def __init__(
        self,
        directory: PathLike,
        num_chains: int,
        num_samples: int,
        chunks: list | None = None,
        names: dict | None = None,
    ):
        self.directory = Path(directory)
        self.num_chains, self.num_samples = num_chains, num_samples
        self.chunks: list[dict] = list(chunks or [])
        self.names: dict[str, list[str]] = {g: list((names or {}).get(g, [])) for g in DRAW_GROUPS}

    def write(self, first_chain: int, first_draw: int, values: dict) -> dict:
        """Save one chunk ``{"samples": {...}, "stats": {...}}`` of host tensors ``(chains, draws, ...)``."""
        some = next(v for g in DRAW_GROUPS for v in values[g].values())
        entry: dict[str, Any] = {
            "file": f"chunk-{first_chain:07d}-{first_draw:07d}.pt",
            "chains": [first_chain, some.shape[0]],
            "draws": [first_draw, some.shape[1]],
        }
        atomic_save({g: dict(values[g]) for g in DRAW_GROUPS}, self.directory / entry["file"])
        self.add([entry])
        for g in DRAW_GROUPS:
            if not self.names[g]:
                self.names[g] = list(values[g])
        return entry

    def add(self, entries: list) -> None:
        """Count chunks as written (a resumed run's); one rewritten replaces its old entry."""
        for entry in entries:
            if not (self.directory / entry["file"]).exists():
                raise ValueError(
                    f"{self.directory / entry['file']}: a chunk of draws the checkpoint counts on is missing; "
                    "rerun without resume"
                )
            self.chunks = [c for c in self.chunks if c["file"] != entry["file"]] + [dict(entry)]

    def entries(self, chains: slice) -> list:
        """The chunks of the chains ``chains`` (for a checkpoint)."""
        return [c for c in self.chunks if chains.start <= c["chains"][0] < chains.stop]

    def read(self, group: str, name: str) -> torch.Tensor:
        """``(num_chains, num_samples, ...)`` of one name, assembled from every chunk."""
        out = None
        for c in self.chunks:
            value = safe_load(self.directory / c["file"], mmap=True)[group][name]
            if out is None:
                out = value.new_empty((self.num_chains, self.num_samples, *value.shape[2:]))
            (c0, width), (d0, count) = c["chains"], c["draws"]
            out[c0 : c0 + width, d0 : d0 + count] = value
        if out is None:
            raise KeyError(f"no draws of {name!r} were written to {self.directory}")
        return out

    def copy_to(self, directory: PathLike) -> DrawFiles:
        """The same draws in ``directory`` (files copied unless it is this folder)."""
        directory = Path(directory)
        if directory.resolve() != self.directory.resolve():
            directory.mkdir(parents=True, exist_ok=True)
            for c in self.chunks:
                shutil.copyfile(self.directory / c["file"], directory / c["file"])
        return DrawFiles(directory, **self.state())

    def state(self) -> dict:
        """The index as plain data (saved in a Fit's ``tensors.pt``; the folder is where it lies)."""
        return {
            "num_chains": self.num_chains,
            "num_samples": self.num_samples,
            "chunks": self.chunks,
            "names": self.names,
        }


class LazyDraws(Mapping):
    """``{name: (chain, draw, ...)}`` of one group of :class:`DrawFiles`, read from disk on access
    (each access reads anew, so memory holds only what the caller keeps)."""

    def __init__(self, files: DrawFiles, group: str):
        if group not in DRAW_GROUPS:
            raise ValueError(f"group must be one of {DRAW_GROUPS}, got {group!r}")
        self.files, self.group = files, group

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.files.names[self.group]:
            raise KeyError(name)
        return self.files.read(self.group, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.files.names[self.group])

    def __len__(self) -> int:
        return len(self.files.names[self.group])

    def __repr__(self) -> str:
        return f"LazyDraws({self.group} {list(self)} in {self.files.directory}, {len(self.files.chunks)} chunks)"


# ---------------------------------------------------------------------------------------------
# constraints of Pyro params, as plain data


def constraint_to_spec(c: constraints.Constraint) -> dict:
    """Describe a torch constraint as a dict of primitives (so it survives ``weights_only``)."""
    spec: dict[str, Any] = {"type": type(c).__name__}
    for attr in ("lower_bound", "upper_bound", "reinterpreted_batch_ndims", "event_dim"):
        if attr in vars(c):
            v = getattr(c, attr)
            spec[attr] = v.tolist() if isinstance(v, torch.Tensor) else v
    if hasattr(c, "base_constraint"):
        spec["base"] = constraint_to_spec(c.base_constraint)
    return spec


def constraint_from_spec(spec: dict) -> constraints.Constraint:
    import pyro.distributions.constraints as pc

    t = spec["type"]
    for module in (constraints, pc):
        cls = getattr(module, t, None)
        if cls is not None:
            break
    else:
        raise ValueError(f"unknown constraint type {t!r} in saved parameters")
    if t == "_IndependentConstraint":
        return cls(constraint_from_spec(spec["base"]), spec["reinterpreted_batch_ndims"])
    if t in ("_Interval", "_HalfOpenInterval"):
        return cls(spec["lower_bound"], spec["upper_bound"])
    if t in ("_GreaterThan", "_GreaterThanEq"):
        return cls(spec["lower_bound"])
    if t == "_LessThan":
        return cls(spec["upper_bound"])
    return cls()


def param_store_state() -> dict:
    """The global param store as ``{"params": {name: unconstrained}, "constraints": {name: spec}}``."""
    store = pyro.get_param_store()
    state = store.get_state()
    return {
        "params": {k: v.detach().clone() for k, v in state["params"].items()},
        "constraints": {k: constraint_to_spec(c) for k, c in state["constraints"].items()},
    }


def restore_param_store(state: dict, device: Device = None) -> None:
    """Put saved params into the global param store.

    A param that already exists is overwritten in place, so modules registered with
    ``pyro.module`` keep sharing their tensors with the store; others are inserted.
    """
    store = pyro.get_param_store()
    for name, value in state["params"].items():
        value = value.detach().to(device if device is not None else value.device)
        current = store._params.get(name)
        if current is not None and current.shape == value.shape:
            with torch.no_grad():
                current.copy_(value)
            continue
        p = torch.nn.Parameter(value.clone())
        store._params[name] = p
        store._param_to_name[p] = name
        store._constraints[name] = constraint_from_spec(state["constraints"][name])


# ---------------------------------------------------------------------------------------------


@dataclass
class Fit:
    """What an engine returns.

    ``params`` is the param-store state (unconstrained values and constraint specs) for engines
    that optimize; ``samples`` maps site names to draws shaped ``(chains, draws, ...)`` for
    samplers (a :class:`LazyDraws` reading them from disk on access when the
    sampler streamed them there). ``model``/``guide`` are the Pyro programs and ``module`` the zoo object they belong
    to, if any (not saved; rebuilt from ``spec`` on load when the model came from the zoo or a
    ``file.py:function``). ``args``/``kwargs`` are what the model was called with.
    """

    engine: str
    config: dict = field(default_factory=dict)
    history: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)
    params: dict | None = None
    samples: Mapping[str, torch.Tensor] | None = None
    spec: dict | None = None
    extra: dict = field(default_factory=dict)
    model: Callable | None = None
    guide: Callable | None = None
    module: Any = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    # -- state ------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return len(self.history.get("loss", []))

    def restore(self, device: Device = None) -> Fit:
        """Load this fit's parameters into Pyro's param store (so ``model``/``guide`` use them)."""
        if self.params is not None:
            restore_param_store(self.params, device)
        return self

    def param(self, name: str) -> torch.Tensor:
        """A trained parameter by name, constrained as the model declared it."""
        if self.params is None or name not in self.params["params"]:
            have = sorted(self.params["params"]) if self.params else []
            raise KeyError(f"no parameter {name!r} in this fit; have {have}")
        c = constraint_from_spec(self.params["constraints"][name])
        return torch.distributions.transform_to(c)(self.params["params"][name]).detach()

    # -- ArviZ ------------------------------------------------------------------------------
    def to_arviz(self, num_samples: int = 500, **kwargs: Any) -> Any:
        """An ``arviz.InferenceData`` with plate names as dims (see :mod:`ppdgm.diagnostics`)."""
        from ppdgm.diagnostics import fit_to_inference_data

        self.reload_data()
        return fit_to_inference_data(self, num_samples=num_samples, **kwargs)

    def reload_data(self) -> None:
        """A saved Fit keeps no data; one that ``ppdgm fit`` wrote names the dataset or file it was fit
        on (``config["data"]``), so its training split becomes ``args`` again. Others are left as they
        are: set ``fit.args`` to the data yourself."""
        if self.args or not self.config.get("data"):
            return
        from ppdgm.data import load_dataset

        train = load_dataset(self.config["data"], "train")
        self.args = tuple(self.module.data_args(train)) if self.module is not None else (train.x,)

    # -- files ------------------------------------------------------------------------------
    def save(self, directory: PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Any] = {"params": self.params, "samples": self.samples, "extra": self.extra.get("tensors")}
        tensors.update(_draw_files_saved(self.samples, tensors["extra"], directory))
        if isinstance(self.module, torch.nn.Module):
            tensors["module"] = self.module.state_dict()
        atomic_save(tensors, directory / TENSORS_FILE)
        meta = {
            "engine": self.engine,
            "config": self.config,
            "history": self.history,
            "timing": self.timing,
            "spec": self.spec,
            "extra": {k: v for k, v in self.extra.items() if k != "tensors"},
        }
        atomic_write_text(json.dumps(meta, indent=1, default=_jsonable), directory / FIT_FILE)
        return directory


def _draw_files_saved(samples: Any, extra_tensors: dict | None, directory: Path) -> dict:
    """Draws streamed to chunk files are saved as those files (copied into ``directory/draws``)
    and their index, never read into memory: ``{"samples", "extra", "draw_files"}`` to save, or {}."""
    stats = extra_tensors.get("sample_stats") if isinstance(extra_tensors, dict) else None
    source = samples if isinstance(samples, LazyDraws) else stats
    if not isinstance(source, LazyDraws):
        return {}
    lazy = [group for group, value in (("samples", samples), ("stats", stats)) if isinstance(value, LazyDraws)]
    files = source.files.copy_to(directory / DRAWS_FOLDER)
    return {
        "samples": None if "samples" in lazy else samples,
        "extra": {**(extra_tensors or {}), "sample_stats": None} if "stats" in lazy else extra_tensors,
        "draw_files": {"index": files.state(), "groups": lazy},
    }


def _draw_files_loaded(tensors: dict, directory: Path) -> dict:
    """The lazy ``samples`` (and ``sample_stats``) of a Fit saved with chunk files of draws."""
    saved = tensors.get("draw_files")
    if not saved:
        return tensors
    files = DrawFiles(directory / DRAWS_FOLDER, **saved["index"])
    out = dict(tensors)
    if "samples" in saved["groups"]:
        out["samples"] = LazyDraws(files, "samples")
    if "stats" in saved["groups"]:
        out["extra"] = {**(tensors.get("extra") or {}), "sample_stats": LazyDraws(files, "stats")}
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    return repr(obj)


def load(
    directory: PathLike,
    model: Callable | None = None,
    guide: Callable | None = None,
    device: Device = None,
    trust_code: bool = False,
) -> Fit:
    """Read a saved Fit. Zoo models are rebuilt from the saved spec. A fit of a user's
    ``file.py:function`` model names that file; it is imported (that is, run) only with
    ``trust_code=True`` — otherwise pass ``model=`` (and ``guide=``) or expect
    :class:`UntrustedCodeError`, so opening a folder from elsewhere never runs its code."""
    directory = Path(directory)
    if not (directory / FIT_FILE).exists():
        raise FileNotFoundError(f"{directory}: no {FIT_FILE}; expected a folder written by Fit.save")
    try:
        meta = json.loads((directory / FIT_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{directory / FIT_FILE}: the file is truncated or corrupt ({err})") from None
    spec = meta.get("spec")
    if model is None and spec and "function" in spec and not trust_code:
        files = [spec["function"].rpartition(":")[0]] + (
            [spec["guide"].rpartition(":")[0]] if spec.get("guide") else []
        )
        raise UntrustedCodeError(
            f"{directory / FIT_FILE} names Python code ({', '.join(files)}); opening it would run that file: "
            f"pass trust_code=True (command line: --trust-code) if you trust it, or model= to supply the model"
        )
    tensors = safe_load(directory / TENSORS_FILE, map_location=device) if (directory / TENSORS_FILE).exists() else {}
    tensors = _draw_files_loaded(tensors, directory)
    extra = dict(meta.get("extra") or {})
    if tensors.get("extra") is not None:
        extra["tensors"] = tensors["extra"]
    fit = Fit(
        engine=meta["engine"],
        config=meta.get("config", {}),
        history=meta.get("history", {}),
        timing=meta.get("timing", {}),
        params=tensors.get("params"),
        samples=tensors.get("samples"),
        spec=spec,
        extra=extra,
        model=model,
        guide=guide,
    )
    if model is None and fit.spec is not None:
        from ppdgm.models import build_from_spec

        fit.model, fit.guide, fit.module = build_from_spec(fit.spec, trust_code=trust_code)
        if isinstance(fit.module, torch.nn.Module):
            if "module" in tensors:
                # autoguide params are created lazily; they come back through the param store
                fit.module.load_state_dict(tensors["module"], strict=False)
            if device is not None:
                fit.module.to(device)
    if fit.guide is None and fit.model is not None and fit.extra.get("autoguide") == "AutoNormal":
        from pyro.infer.autoguide import AutoNormal

        fit.guide = AutoNormal(fit.model)
    if fit.params is not None:
        fit.restore(device)
    return fit
