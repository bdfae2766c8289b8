"""The ``ppdgm`` command: list, fit, sample, evaluate, diagnose.

Exit codes: 0 done; 2 a usage or input error (bad arguments, unreadable data or checkpoint, an
output folder or file that cannot be written, a write that failed during or after the work:
anything already saved is kept); 1 a model error at run time (the model raised while being fit,
evaluated or sampled). Every error is one line on stderr, never a traceback. Heavy modules
(torch, pyro, arviz) are imported inside the commands so ``ppdgm --help`` is quick.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

EXIT_MODEL_ERROR = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad arguments or input; exit 2."""


class WriteError(Exception):
    """A result could not be written; exit 2 (what was already saved is kept)."""


class ModelError(Exception):
    """The model (or the engine running it) failed at run time; exit 1."""


def one_line(err: BaseException) -> str:
    """An exception and its causes as one line, keeping the useful part of multi-line messages
    (Pyro's "Error while computing log_prob at site 'x':" is followed by the reason on the next
    line and a table of trace shapes, which is dropped)."""
    parts: list[str] = []
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        lines = []
        for line in str(cause).splitlines():
            if line.strip().startswith("Trace Shapes"):
                break
            if line.strip():
                lines.append(line.strip())
        text = " ".join(lines) or type(cause).__name__
        if not any(text in p for p in parts):
            parts.append(text)
        cause = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)
    return ": ".join(parts)


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


def _is_file_model(name: str) -> bool:
    path, sep, _ = name.rpartition(":")
    return bool(sep) and path.endswith(".py")


# ---------------------------------------------------------------------------------------------
# list


def cmd_list(args) -> int:
    from ppdgm.data import DATASETS
    from ppdgm.families import engines_for
    from ppdgm.inference import ENGINES, engine_class
    from ppdgm.models import MODELS, model_class

    print("families (engines that run it, its default first; datasets it suits, the quickest first):")
    for name in sorted(MODELS):
        cls = model_class(name)
        print(f"  {name:<11} engines: {', '.join(engines_for(cls)):<30} datasets: {', '.join(cls.datasets)}")
    print("  path/to/file.py:function   engines: svi, nuts, hmc, chees   datasets: any (a .npy/.csv/IDX file)")
    print("engines:  " + ", ".join(f"{n} ({engine_class(n).input})" for n in ENGINES))
    print("datasets: " + ", ".join(DATASETS) + ", path/to/file.(npy|csv|idx)")
    return 0


# ---------------------------------------------------------------------------------------------
# fit


def _file_program(args):
    """``(model, guide, spec)`` of a user's ``file.py:function`` (and ``--guide``)."""
    from ppdgm.models import load_function

    def resolved(target):
        path, _, fn = target.rpartition(":")
        return f"{Path(path).resolve()}:{fn}"

    model = load_function(args.model)
    guide = load_function(args.guide) if args.guide else None
    spec = {"function": resolved(args.model)}
    if args.guide:
        spec["guide"] = resolved(args.guide)
    return model, guide, spec


def _engine_options(args) -> dict:
    """The command line's generic flags as engine constructor arguments (None = not given)."""
    return {
        "num_steps": args.steps,
        "num_epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "device": args.device,
        "checkpoint_every": args.checkpoint_every,
        "progress": args.progress,
    }


def _announce_resume(out: Path) -> None:
    """Say whether ``--resume`` continues a checkpoint (from which step) or starts from scratch."""
    from ppdgm.fit import safe_load

    found = sorted(out.glob("checkpoint.pt")) + sorted(out.glob("layer*/checkpoint.pt"))
    if not found:
        print(f"ppdgm fit: no checkpoint in {out}: starting from scratch", file=sys.stderr)
        return
    where = []
    for path in found:
        state = safe_load(path)  # a truncated checkpoint is reported here, before any work
        step = state.get("step")
        done = f"step {step}" if step is not None else f"{len(state.get('chains') or [])} finished chain(s)"
        where.append(f"{path.relative_to(out)} at {done}")
    print(f"ppdgm fit: resuming from {', '.join(where)}", file=sys.stderr)


def _warn(command: str):
    """One line on stderr, as the command's other warnings."""
    return lambda message: print(f"ppdgm {command}: warning: {message}", file=sys.stderr)


def _tracker(args, out: Path, spec: dict):
    """The MLflow tracker of ``--track mlflow`` (None without it); it logs the folder after saving."""
    if args.track is None:
        return None
    from ppdgm.tracking import MLflowTracker

    params = {"model": args.model, "data": args.data, "spec": spec}
    return MLflowTracker(
        args.tracking_uri, out=out, params=params, resume=args.resume, log_fit=False, warn=_warn("fit")
    )


def _quiet_mlflow() -> None:
    """MLflow and its migrations log INFO lines on first use of a store; the command says what matters."""
    import logging

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def cmd_fit(args) -> int:
    from ppdgm.fit import check_writable

    if args.track is not None:
        from ppdgm.tracking import require_mlflow

        require_mlflow()  # before any work: exit 2 naming the extra to install
        _quiet_mlflow()
    elif args.tracking_uri is not None:
        raise UsageError("--tracking-uri needs --track mlflow")
    out = check_writable(args.out, "--out")
    set_kwargs = _parse_assignments(args.set, "--set")
    engine_opts = _parse_assignments(args.engine_opt, "--engine-opt")
    file_model = _is_file_model(args.model)
    if not file_model:
        from ppdgm.models import MODELS

        if args.model not in MODELS:
            raise UsageError(
                f"unknown model {args.model!r}; expected one of {sorted(MODELS)} or path/to/file.py:function"
            )
    elif args.set:
        raise UsageError("--set configures a zoo family; a file model takes its arguments from its own code")

    import torch

    from ppdgm.data import load_dataset
    from ppdgm.families import build_family, fit_family, make_engine

    train = load_dataset(args.data, "train")
    if args.nproc is not None:
        from ppdgm.distributed import check_nproc

        check_nproc(args.nproc, len(train), args.batch_size)
        if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
            return launch_torchrun(args.nproc)
    valid = load_dataset(args.data, "valid") if not Path(args.data).exists() else None
    torch.manual_seed(args.seed if args.seed is not None else 0)
    if file_model:
        model, guide, spec = _file_program(args)
        family = None
    else:
        family = build_family(args.model, train, **set_kwargs)
        spec = family.spec
    engine = make_engine(family, args.engine, _engine_options(args), explicit=engine_opts)
    if file_model and engine.input not in ("program", "posterior"):
        raise UsageError(
            f"engine {engine.name!r} needs a zoo family ({engine.input}); a file model is a Pyro "
            f"program: use svi, nuts, hmc or chees"
        )
    if args.resume:
        _announce_resume(out)
    tracker = _tracker(args, out, spec)
    callbacks = [tracker] if tracker is not None else []

    try:
        if family is not None:
            fit = fit_family(family, engine, train, valid, checkpoint_dir=out, resume=args.resume, callbacks=callbacks)
        elif engine.input == "program":
            fit = engine.run(
                model,
                guide,
                (train.x,),
                val_data=(valid.x,) if valid else None,
                checkpoint_dir=out,
                resume=args.resume,
                callbacks=callbacks,
            )
        else:
            fit = engine.run(model, train.x, checkpoint_dir=out, resume=args.resume, callbacks=callbacks)
    except OSError as err:
        raise WriteError(
            f"could not write to {out} while training ({one_line(err)}); checkpoints already written there are kept"
        ) from err
    except Exception as err:
        raise ModelError(one_line(err)) from err
    if family is None:
        fit.extra["num_points"] = {"train": len(train), "valid": len(valid) if valid else None}
        fit.spec = spec
        if fit.extra.get("autoguide"):
            fit.spec["autoguide"] = fit.extra["autoguide"]
    fit.config["data"] = args.data
    from ppdgm.distributed import finish

    finish()
    if os.environ.get("RANK", "0") != "0":  # only rank 0 writes
        return 0
    try:
        fit.save(out)
    except OSError as err:
        raise WriteError(
            f"training finished but saving the fit to {out} failed ({one_line(err)}); "
            f"checkpoints already written there are kept"
        ) from err
    from ppdgm.reports import convergence_warnings, write_fit_report

    try:
        written = write_fit_report(fit, out)
    except OSError as err:
        raise WriteError(f"the fit is saved in {out} but writing its report failed ({one_line(err)})") from err
    if tracker is not None:
        tracker.log_folder(out)
    if fit.num_steps or not fit.samples:
        work = f"{fit.num_steps} steps"
    else:  # a sampler: draws shaped (chain, draw, ...)
        chains, draws = next(iter(fit.samples.values())).shape[:2]
        work = f"{chains} chains x {draws} draws"
    print(
        f"saved {fit.engine} fit of {args.model} to {out} ({work}, {fit.timing.get('seconds', 0):.1f} s); "
        f"wrote {', '.join(written)}"
    )
    if tracker is not None and tracker.stopped is None:
        print(f"tracked as MLflow run {tracker.run_id} in {tracker.tracking_uri}")
    for warning in convergence_warnings(fit):
        print(f"ppdgm fit: warning: {warning}", file=sys.stderr)
    return 0


def launch_torchrun(nproc: int) -> int:
    """Re-run this ``ppdgm fit`` command under torchrun with ``nproc`` processes on this machine."""
    argv = sys.argv[1:]
    i = argv.index("--nproc")
    argv = argv[:i] + argv[i + 2 :]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "--module",
        "ppdgm.cli",
        *argv,
    ]
    return subprocess.call(cmd)


# ---------------------------------------------------------------------------------------------
# sample, evaluate, diagnose


def _load(args):
    import ppdgm

    return ppdgm.load(args.dir, trust_code=args.trust_code)


def cmd_sample(args) -> int:
    from ppdgm.fit import check_writable

    if args.n < 1:
        raise UsageError(f"-n must be >= 1, got {args.n}")
    output = Path(args.output)
    if output.is_dir():
        raise UsageError(f"-o {output} is a folder; expected an image file name such as samples.png")
    check_writable(output.parent if str(output.parent) else ".", "the folder of -o")
    fit = _load(args)
    if fit.module is None:
        raise UsageError(f"{args.dir}: sampling needs a zoo family (this fit is of a file model)")
    import torch

    from ppdgm.reports import save_image_grid

    try:
        with torch.no_grad():
            x = fit.module.sample(args.n)
    except (TypeError, ValueError) as err:  # refused before any compute (a BNN needs inputs x)
        raise UsageError(f"{args.dir}: {one_line(err)}") from err
    except Exception as err:
        raise ModelError(one_line(err)) from err
    try:
        save_image_grid(x, output)
    except OSError as err:
        raise WriteError(f"could not write {output} ({one_line(err)})") from err
    print(f"wrote {args.n} samples to {output}")
    return 0


def cmd_evaluate(args) -> int:
    from ppdgm.data import load_dataset
    from ppdgm.families import evaluate_family

    fit = _load(args)
    if fit.module is None:
        raise UsageError(f"{args.dir}: evaluating in nats needs a zoo family with log_likelihood(x)")
    test = load_dataset(args.data or fit.config.get("data"), args.split)
    options = _parse_assignments(args.opt, "--opt")
    if args.progress is not False:
        print(f"evaluating {fit.spec['name']} on {len(test)} {args.split} points ...", file=sys.stderr, flush=True)
    try:
        result = evaluate_family(fit.module, test, **options)
    except (TypeError, ValueError) as err:
        if isinstance(err, TypeError) and "unexpected keyword" in str(err):
            raise UsageError(f"--opt: {one_line(err)}") from err
        raise
    print(result if not isinstance(result, dict) else " ".join(f"{k}={v}" for k, v in result.items()))
    from ppdgm.tracking import RUN_FILE, log_evaluation

    if (Path(args.dir) / RUN_FILE).is_file():  # the fit was tracked: its run gets the held-out numbers
        _quiet_mlflow()
        if log_evaluation(args.dir, result, args.split, warn=_warn("evaluate")):
            print("logged to the fit's MLflow run", file=sys.stderr)
    return 0


def cmd_diagnose(args) -> int:
    from ppdgm.reports import convergence_warnings, diagnose_text

    fit = _load(args)
    fit.reload_data()
    print(
        diagnose_text(
            fit, var_names=args.var, num_samples=args.num_samples, max_rows=args.max_rows, progress=args.progress
        ),
        end="",
    )
    for warning in convergence_warnings(fit):
        print(f"ppdgm diagnose: warning: {warning}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------


class HelpWithDefaults(argparse.HelpFormatter):
    """Help that shows an option's default where it has one (not "None")."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if not (default is None or default is False or default == argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def parser() -> argparse.ArgumentParser:
    fmt = HelpWithDefaults
    p = argparse.ArgumentParser(
        prog="ppdgm",
        description="Deep generative models as Pyro programs.",
        epilog="exit codes: 0 done, 1 model error at run time, 2 usage, input or write error",
    )
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser(
        "list", help="families, the engines that run them and the datasets they suit", formatter_class=fmt
    ).set_defaults(func=cmd_list)

    progress = argparse.ArgumentParser(add_help=False)
    progress.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars: --progress shows them even off a terminal, --no-progress never "
        "(default: on a terminal only)",
    )
    threads = argparse.ArgumentParser(add_help=False)
    threads.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; the bundled models are small-tensor loops that run fastest on "
        "one (a GAN on digits: 50 ms/step at 1 thread, 2.6 s at 2 on a busy 2-core machine)",
    )
    trust = argparse.ArgumentParser(add_help=False)
    trust.add_argument(
        "--trust-code",
        action="store_true",
        help="allow opening a fit of a file.py:function model, which runs that file",
    )

    f = sub.add_parser(
        "fit",
        help="fit a model to data with an engine and save the Fit",
        formatter_class=fmt,
        parents=[progress, threads],
    )
    f.add_argument("model", help="a zoo family (see `ppdgm list`) or path/to/file.py:function")
    f.add_argument("--data", required=True, help="bundled dataset name (see `ppdgm list`) or a .npy/.csv/IDX file")
    f.add_argument("--out", required=True, help="output folder: fit, checkpoints, plots, summary")
    f.add_argument("--guide", help="path/to/file.py:function guide for a file model (default: AutoNormal)")
    f.add_argument("--engine", help="engine name (default: the family's own; svi for a file model)")
    f.add_argument("--steps", type=int, help="optimization steps (training engines; default: the engine's)")
    f.add_argument("--epochs", type=int, help="passes over the data, instead of --steps (training engines)")
    f.add_argument("--batch-size", type=int, help="points per step (training engines; default: the engine's)")
    f.add_argument("--lr", type=float, help="learning rate (training engines; default: the family's or engine's)")
    f.add_argument("--seed", type=int, default=0, help="random seed")
    f.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: where the data is)")
    f.add_argument("--checkpoint-every", type=int, help="steps between checkpoints written to --out")
    f.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    f.add_argument("--nproc", type=int, help="data-parallel processes on this machine (starts torchrun)")
    f.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="family constructor argument, repeatable (unknown keys list the valid ones)",
    )
    f.add_argument(
        "--engine-opt",
        action="append",
        metavar="KEY=VALUE",
        help="engine constructor argument, repeatable, e.g. num_samples=200 for a sampler",
    )
    f.add_argument(
        "--track",
        choices=["mlflow"],
        help="record params, metric series and the saved fit in an MLflow store (pip install ppdgm[track])",
    )
    f.add_argument(
        "--tracking-uri", metavar="URI", help="MLflow tracking URI for --track (default: sqlite:///<out>/../mlruns.db)"
    )
    f.set_defaults(func=cmd_fit)

    s = sub.add_parser(
        "sample", help="draw samples from a saved fit into an image grid", formatter_class=fmt, parents=[trust, threads]
    )
    s.add_argument("dir", help="folder of a saved fit")
    s.add_argument("-n", type=int, default=64, help="number of samples")
    s.add_argument("-o", "--output", default="samples.png", help="image file to write")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser(
        "evaluate",
        help="held-out log-likelihood in nats of a saved fit",
        formatter_class=fmt,
        parents=[progress, trust, threads],
    )
    e.add_argument("dir", help="folder of a saved fit")
    e.add_argument("--data", help="dataset (default: the one it was fit on)")
    e.add_argument("--split", default="test", help="train, valid or test")
    e.add_argument(
        "--opt",
        action="append",
        metavar="KEY=VALUE",
        help="estimator option, repeatable, e.g. k=1000 (IWAE) or num_runs=100 (AIS)",
    )
    e.set_defaults(func=cmd_evaluate)

    d = sub.add_parser(
        "diagnose",
        help="ArviZ summary (R-hat, ESS, MCSE) of what a saved fit inferred",
        formatter_class=fmt,
        parents=[progress, trust, threads],
    )
    d.add_argument("dir", help="folder of a saved fit")
    d.add_argument("--var", action="append", help="variables to summarize, repeatable (default: global ones)")
    d.add_argument("--num-samples", type=int, default=200, help="guide draws for optimized fits")
    d.add_argument("--max-rows", type=int, default=40, help="rows of the summary table shown")
    d.set_defaults(func=cmd_diagnose)
    return p


def main(argv=None) -> int:
    from ppdgm.progress import show_progress

    args = parser().parse_args(argv)
    try:
        if getattr(args, "threads", None) is not None:
            if args.threads < 1:
                raise UsageError(f"--threads must be >= 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        # every loop, estimators' too, follows --progress/--no-progress for this command
        show_progress(getattr(args, "progress", None))
        return args.func(args)
    except ModelError as err:
        print(f"ppdgm {args.command}: model error: {err}", file=sys.stderr)
        return EXIT_MODEL_ERROR
    except (UsageError, WriteError, ValueError, TypeError, FileNotFoundError, KeyError, ImportError, OSError) as err:
        print(f"ppdgm {args.command}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        show_progress(None)


if __name__ == "__main__":
    sys.exit(main())
