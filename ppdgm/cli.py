"""The ``ppdgm`` command: list, fit, sample, evaluate, diagnose.

Bad arguments end with a one-line message and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

USAGE_ERRORS = (ValueError, TypeError, FileNotFoundError, KeyError)


class UsageError(Exception):
    pass


def _parse_assignments(items, what):
    """``["k=v", ...]`` -> dict, values parsed as JSON when they parse (ints, floats, lists, bools)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{what} expects key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _accepted(cls, options: dict) -> dict:
    """Keep the options that ``cls.__init__`` takes; unknown explicit ones are an error upstream."""
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in options.items() if k in params and v is not None}


# ---------------------------------------------------------------------------------------------


def cmd_list(args) -> int:
    from ppdgm.data import DATASETS
    from ppdgm.inference import ENGINES
    from ppdgm.models import MODELS

    print("models:   " + ", ".join(sorted(MODELS)) + ", path/to/file.py:function")
    print("engines:  " + ", ".join(sorted(ENGINES)))
    print("datasets: " + ", ".join(DATASETS) + ", path/to/file.(npy|csv|idx)")
    return 0


def _build_model(args, train):
    """A zoo object, or ``(function, guide)`` for ``file.py:function``."""
    from ppdgm.models import MODELS, load_function, model_class

    kwargs = _parse_assignments(args.set, "--set")
    if args.model in MODELS:
        cls = model_class(args.model)
        obj = cls.from_data(train, **kwargs) if hasattr(cls, "from_data") else cls(**kwargs)
        if getattr(obj, "support", None):  # the instance's, since options like likelihood= change it
            from ppdgm.data import check_data

            check_data(train.x, f"--data {args.data}", support=obj.support)
        return obj, obj.spec
    if ":" in args.model and args.model.rpartition(":")[0].endswith(".py"):
        fn = load_function(args.model)
        guide = load_function(args.guide) if args.guide else None
        spec = {"function": str(Path(args.model.rpartition(":")[0]).resolve()) + ":" + args.model.rpartition(":")[2]}
        if args.guide:
            spec["guide"] = str(Path(args.guide.rpartition(":")[0]).resolve()) + ":" + args.guide.rpartition(":")[2]
        return (fn, guide), spec
    raise UsageError(f"unknown model {args.model!r}; expected one of {sorted(MODELS)} or path/to/file.py:function")


def cmd_fit(args) -> int:
    import torch

    from ppdgm.data import load_dataset
    from ppdgm.inference import engine_class

    train = load_dataset(args.data, "train")
    if args.nproc is not None:
        from ppdgm.distributed import check_nproc

        check_nproc(args.nproc, len(train), args.batch_size)
        if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
            return launch_torchrun(args.nproc)
    valid = load_dataset(args.data, "valid") if not Path(args.data).exists() else None
    torch.manual_seed(args.seed)
    obj, spec = _build_model(args, train)
    zoo = not isinstance(obj, tuple)
    engine_name = args.engine or (getattr(obj, "default_engine", "svi") if zoo else "svi")
    cls = engine_class(engine_name)
    options = {"num_steps": args.steps, "num_epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
               "seed": args.seed, "device": args.device, "progress": None if args.progress else False,
               "checkpoint_every": args.checkpoint_every}
    # a model may need engine settings to be trained at all (M2's enumerated labels) or well (an
    # RBM's Adam); they apply to its default engine, and flags given on the command line win
    suggested = getattr(obj, "engine_config", {}) if zoo and engine_name == obj.default_engine else {}
    extra = _parse_assignments(args.engine_opt, "--engine-opt")
    unknown = set(extra) - set(inspect.signature(cls.__init__).parameters)
    if unknown:
        raise UsageError(f"engine {engine_name!r} takes no option(s) {sorted(unknown)}")
    engine = cls(**{**_accepted(cls, suggested), **_accepted(cls, options), **extra})
    out = Path(args.out)
    train_args = obj.data_args(train) if zoo and hasattr(obj, "data_args") else (train.x,)
    valid_args = (obj.data_args(valid) if zoo and hasattr(obj, "data_args") else (valid.x,)) if valid else None
    if zoo and hasattr(engine, "run_zoo"):
        fit = engine.run_zoo(obj, train_args, valid_args, checkpoint_dir=out, resume=args.resume)
    else:
        model, guide = (obj.model, getattr(obj, "guide", None)) if zoo else obj
        fit = engine.run(model, guide, train_args, val_data=valid_args, checkpoint_dir=out, resume=args.resume)
    fit.spec = spec
    if zoo:
        fit.module = obj
        if hasattr(obj, "attach_posterior") and not fit.samples and fit.guide is not None:
            # a model that predicts from posterior draws (the BNN) gets the guide's when fit by SVI
            from ppdgm.diagnostics import guide_draws

            fit.samples = guide_draws(fit.model, fit.guide, fit.args, fit.kwargs, num_samples=200)
            obj.attach_posterior(fit.samples)
    elif fit.extra.get("autoguide"):
        fit.spec["autoguide"] = fit.extra["autoguide"]
    fit.config["data"] = args.data
    from ppdgm.distributed import finish

    finish()
    if os.environ.get("RANK", "0") != "0":  # only rank 0 writes
        return 0
    fit.save(out)
    from ppdgm.reports import write_fit_report

    written = write_fit_report(fit, out)
    if fit.num_steps or not fit.samples:
        work = f"{fit.num_steps} steps"
    else:  # a sampler: draws shaped (chain, draw, ...)
        chains, draws = next(iter(fit.samples.values())).shape[:2]
        work = f"{chains} chains x {draws} draws"
    print(f"saved {fit.engine} fit of {args.model} to {out} ({work}, {fit.timing.get('seconds', 0):.1f} s); "
          f"wrote {', '.join(written)}")
    return 0


def launch_torchrun(nproc: int) -> int:
    """Re-run this ``ppdgm fit`` command under torchrun with ``nproc`` processes on this machine."""
    argv = sys.argv[1:]
    i = argv.index("--nproc")
    argv = argv[:i] + argv[i + 2:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--module", "ppdgm.cli", *argv]
    return subprocess.call(cmd)


def cmd_sample(args) -> int:
    import ppdgm
    from ppdgm.reports import save_image_grid

    fit = ppdgm.load(args.dir)
    if fit.module is None or not hasattr(fit.module, "sample"):
        raise UsageError(f"{args.dir}: the model has no sample(n); sampling needs a zoo model")
    x = fit.module.sample(args.n)
    save_image_grid(x, args.output)
    print(f"wrote {args.n} samples to {args.output}")
    return 0


def cmd_evaluate(args) -> int:
    import ppdgm
    from ppdgm.data import load_dataset
    from ppdgm.evaluate import log_likelihood

    fit = ppdgm.load(args.dir)
    if fit.module is None:
        raise UsageError(f"{args.dir}: evaluating in nats needs a zoo model with log_likelihood(x)")
    data = args.data or fit.config.get("data")
    test = load_dataset(data, args.split)
    kwargs = _parse_assignments(args.opt, "--opt")
    # conditional models (BNN, conditional flows) score x given the targets/labels their data_args use
    args = fit.module.data_args(test) if hasattr(fit.module, "data_args") else (test.x,)
    if len(args) > 1 and "y" in inspect.signature(fit.module.log_likelihood).parameters:
        kwargs.setdefault("y", args[1])
    print(log_likelihood(fit.module, test.x, **kwargs))
    return 0


def cmd_diagnose(args) -> int:
    import arviz as az

    import ppdgm

    from ppdgm.data import load_dataset

    fit = ppdgm.load(args.dir)
    if not fit.args and fit.config.get("data"):  # data is not saved with a fit; reload it by name
        train = load_dataset(fit.config["data"], "train")
        fit.args = fit.module.data_args(train) if hasattr(fit.module, "data_args") else (train.x,)
    hist = fit.history
    if hist.get("loss"):
        tail = hist["loss"][-max(1, len(hist["loss"]) // 10):]
        print(f"{fit.engine}: {len(hist['loss'])} steps, final loss {sum(tail) / len(tail):.4g} (mean of last 10%)")
    idata = fit.to_arviz(num_samples=args.num_samples)
    with az.rc_context({"stats.information_criterion": "loo"}):
        print(az.summary(idata, var_names=args.var, kind="all").to_string(max_rows=args.max_rows))
    return 0


# ---------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ppdgm", description="Deep generative models as Pyro programs.")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("list", help="models, engines and datasets").set_defaults(func=cmd_list)

    f = sub.add_parser("fit", help="fit a model to data with an engine and save the Fit")
    f.add_argument("model", help="a zoo model name (see `ppdgm list`) or path/to/file.py:function")
    f.add_argument("--data", required=True, help="bundled dataset name or path to .npy/.csv/IDX")
    f.add_argument("--guide", help="path/to/file.py:function guide for a file model (default AutoNormal)")
    f.add_argument("--engine", help="engine name (default: the model's own)")
    f.add_argument("--out", required=True, help="output folder (fit, checkpoints, plots)")
    f.add_argument("--steps", type=int, help="number of steps")
    f.add_argument("--epochs", type=int, help="number of epochs (overrides --steps)")
    f.add_argument("--batch-size", type=int)
    f.add_argument("--lr", type=float)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--device", help="cpu, cuda, cuda:1 ...")
    f.add_argument("--checkpoint-every", type=int, help="steps between checkpoints in --out")
    f.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    f.add_argument("--progress", action="store_true", help="show a progress bar even off a terminal")
    f.add_argument("--nproc", type=int, help="data-parallel processes on this machine (starts torchrun)")
    f.add_argument("--set", action="append", metavar="KEY=VALUE", help="model argument (repeatable)")
    f.add_argument("--engine-opt", action="append", metavar="KEY=VALUE", help="engine argument (repeatable)")
    f.set_defaults(func=cmd_fit)

    s = sub.add_parser("sample", help="draw samples from a saved fit into an image grid")
    s.add_argument("dir")
    s.add_argument("-n", type=int, default=64)
    s.add_argument("-o", "--output", default="samples.png")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("evaluate", help="held-out log-likelihood in nats of a saved fit")
    e.add_argument("dir")
    e.add_argument("--data", help="dataset (default: the one it was fit on)")
    e.add_argument("--split", default="test")
    e.add_argument("--opt", action="append", metavar="KEY=VALUE", help="estimator option, e.g. k=1000")
    e.set_defaults(func=cmd_evaluate)

    d = sub.add_parser("diagnose", help="ArviZ summary (R-hat, ESS, MCSE) of a saved fit")
    d.add_argument("dir")
    d.add_argument("--var", action="append", help="variables to summarize (repeatable)")
    d.add_argument("--num-samples", type=int, default=500, help="guide draws for optimized fits")
    d.add_argument("--max-rows", type=int, default=40)
    d.set_defaults(func=cmd_diagnose)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "n", 1) is not None and getattr(args, "n", 1) < 1:
        print("ppdgm: error: -n must be >= 1", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (UsageError, *USAGE_ERRORS) as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"ppdgm {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
