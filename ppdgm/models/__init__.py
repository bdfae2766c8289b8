"""The model zoo: one file per family, each a ``PyroModule`` whose ``model``/``guide`` are Pyro programs.

``MODELS`` maps a CLI name to ``"module:Class"`` (imported lazily so ``import ppdgm`` stays fast).
A zoo class is built with keyword arguments only and reports them as ``spec`` so a saved Fit can
rebuild it; ``from_data(dataset, **kw)`` fills in sizes from the data.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

MODELS: dict[str, str] = {
    "ppca": "ppdgm.models.ppca:PPCA",
    "bnn": "ppdgm.models.bnn:BNN",
    "gan": "ppdgm.models.gan:GAN",
    "ebm": "ppdgm.models.ebm:EBM",
    "score": "ppdgm.models.score:ScoreModel",
    "flow": "ppdgm.models.flows:FlowModel",
    "made": "ppdgm.models.autoregressive:MADE",
    "nade": "ppdgm.models.autoregressive:NADE",
    "timeseries": "ppdgm.models.timeseries:DeepAR",
    "vae": "ppdgm.models.vae:VAE",
    "cvae": "ppdgm.models.vae:ConditionalVAE",
    "ssvae": "ppdgm.models.ssvae:SemiSupervisedVAE",
    "rbm": "ppdgm.models.rbm:RBM",
    "dbm": "ppdgm.models.dbm:DBM",
    "mdbm": "ppdgm.models.dbm:MultimodalDBM",
    "dbn": "ppdgm.models.dbn:DBN",
}


def model_class(name: str):
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)} or path/to/file.py:function")
    module, cls = MODELS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def load_function(target: str):
    """``path/to/file.py:function`` -> the function (a user's own Pyro program).

    This imports, that is runs, the file: call it only on a path the user gave or trusts. A
    syntax error or an error raised while importing is reported as a ValueError naming file:line.
    """
    path, sep, func = target.rpartition(":")
    if not sep or not path.endswith(".py"):
        raise ValueError(f"expected path/to/file.py:function, got {target!r}")
    if not Path(path).is_file():
        raise ValueError(f"model file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"model file {path!r}: Python cannot import it (expected a .py file)")
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except SyntaxError as err:
        raise ValueError(f"{err.filename or path}:{err.lineno}: syntax error: {err.msg}") from None
    except Exception as err:  # the user's module failed while importing: say where
        line = _line_in(err, path)
        raise ValueError(
            f"{path}{f':{line}' if line else ''}: error while importing it: {type(err).__name__}: {err}"
        ) from None
    if not callable(getattr(mod, func, None)):
        raise ValueError(f"{path} has no function {func!r}")
    return getattr(mod, func)


def _line_in(err: BaseException, path: str) -> int | None:
    """The last line of ``path`` in the traceback of ``err``."""
    import traceback

    frames = [f for f in traceback.extract_tb(err.__traceback__) if Path(f.filename) == Path(path)]
    return frames[-1].lineno if frames else None


def build_from_spec(spec: dict, trust_code: bool = False):
    """Rebuild ``(model, guide, module)`` from a saved spec.

    A zoo spec names a registered class; a ``file.py:function`` spec names code, which is run
    only with ``trust_code=True`` (ValueError otherwise).
    """
    if "name" in spec:
        obj = model_class(spec["name"])(**spec.get("kwargs", {}))
        return obj.model, getattr(obj, "guide", None), obj
    if not trust_code:
        raise ValueError(
            f"the saved model is Python code ({spec.get('function')}); rebuilding it runs that file: "
            f"pass trust_code=True if you trust it"
        )
    model = load_function(spec["function"])
    guide = load_function(spec["guide"]) if spec.get("guide") else None
    if guide is None and spec.get("autoguide") == "AutoNormal":
        from pyro.infer.autoguide import AutoNormal

        guide = AutoNormal(model)
    return model, guide, None
