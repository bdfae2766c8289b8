"""Figures and text a fit leaves in its output folder: image grids, loss curves, ArviZ summaries."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from matplotlib.figure import Figure


def save_image_grid(x, path, image_shape=None, ncols: int | None = None, title: str | None = None) -> Path:
    """Save ``(n, d)`` samples to a PNG: square images as a grid, 2-D points as a scatter, other
    vectors (series windows) as lines."""
    x = torch.as_tensor(x).detach().cpu().float()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    side = math.isqrt(x[0].numel()) if x.dim() >= 2 else 0
    if x.dim() == 2 and x.shape[1] == 2:
        fig = Figure(figsize=(4, 4))
        ax = fig.subplots()
        ax.scatter(x[:, 0], x[:, 1], s=3, alpha=0.5)
        ax.set_aspect("equal")
    elif image_shape is None and x.dim() == 2 and side * side != x.shape[1]:  # series, not images
        fig = Figure(figsize=(6, 3))
        ax = fig.subplots()
        ax.plot(x[: min(len(x), 16)].T, lw=0.8, alpha=0.7)
        ax.set_xlabel("time step")
    else:
        n = x.shape[0]
        if image_shape is None:
            if side * side != x[0].numel():
                raise ValueError(f"cannot show {x[0].numel()}-dim samples as square images; pass image_shape")
            image_shape = (side, side)
        ncols = ncols or math.ceil(math.sqrt(n))
        nrows = math.ceil(n / ncols)
        h, w = image_shape
        # one tiled image (a 1-pixel gap between tiles): one axes draws in milliseconds, 64 take seconds
        tiles = torch.ones(nrows * (h + 1) + 1, ncols * (w + 1) + 1) * 0.5
        for i in range(n):
            r, c = divmod(i, ncols)
            tiles[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = (
                x[i].reshape(h, w).clamp(0, 1)
            )
        fig = Figure(figsize=(ncols * 0.6, nrows * 0.6))
        ax = fig.subplots()
        ax.imshow(tiles, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


DENSITY_ENGINES = ("svi", "pcd")
"""Fits whose family scores a grid of 2-D points in a moment (exact flows, EBM quadrature); a score
model's likelihood solves an ODE per point, too slow for a plot nobody asked for."""

LOSS_LABELS = {
    "svi": "negative ELBO",
    "pcd": "PCD loss (free-energy gap, data vs chains)",
    "greedy": "PCD loss of each layer",
    "score_matching": "denoising score-matching loss",
    "adversarial": "generator and critic losses",
}
"""What each training engine's ``history["loss"]`` measures, for the y-axis of loss.png."""


def plot_history(
    history: dict, path, keys=("loss", "val_loss"), ylabel: str = "loss", scale: dict | None = None
) -> Path:
    """Training curves of the named history entries (validation plotted at its own steps).

    ``scale`` divides an entry (e.g. ``{"loss": 1200, "val_loss": 300}`` puts a loss summed over
    the training set beside one summed over the validation set in per-point units)."""
    scale = scale or {}
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    for key in keys:
        values = history.get(key)
        if not values:
            continue
        steps = history["val_step"] if key == "val_loss" else range(1, len(values) + 1)
        ax.plot(list(steps), [v / scale.get(key, 1) for v in values], label=key.replace("_", " "), lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)


def plot_fit_history(fit, path) -> Path:
    """loss.png labelled by what the fit's engine optimizes, per data point where the sizes are known."""
    label = LOSS_LABELS.get(fit.engine, "loss")
    keys = ("loss", "critic_loss") if fit.engine == "adversarial" else ("loss", "val_loss")
    sizes = fit.extra.get("num_points") or {}
    scale = {}
    if fit.engine == "svi" and sizes.get("train"):
        scale = {"loss": sizes["train"], "val_loss": sizes.get("valid") or 1}
        label += " per data point"
    return plot_history(fit.history, path, keys=keys, ylabel=label, scale=scale)


def plot_density_over_data(module, data, path) -> Path | None:
    """For a 2-D model with a log-density: its density as a heat map with the data on top."""
    import numpy as np

    data = torch.as_tensor(data).detach().cpu().float()
    lo, hi = data.min(0).values - 0.5, data.max(0).values + 0.5
    gx, gy = torch.meshgrid(torch.linspace(lo[0], hi[0], 80), torch.linspace(lo[1], hi[1], 80), indexing="xy")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    with torch.no_grad():
        logp = module.log_likelihood(grid).reshape(80, 80)
    fig = Figure(figsize=(4, 4))
    ax = fig.subplots()
    ax.imshow(
        np.exp((logp - logp.max()).numpy()),
        origin="lower",
        extent=(lo[0], hi[0], lo[1], hi[1]),
        cmap="viridis",
        aspect="auto",
    )
    ax.scatter(data[:, 0], data[:, 1], s=2, c="white", alpha=0.4, label="data")
    ax.legend(loc="upper right")
    ax.set_title("model density (unnormalized) and data")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return Path(path)


# ---------------------------------------------------------------------------------------------
# summaries and convergence


def summary_text(fit, max_rows: int = 40, num_samples: int = 200, var_names=None, per_point: bool = True) -> str:
    """``az.summary`` of the fit's global latents and a per-point summary of per-datapoint ones.

    Only the global latents get a row per element; per-datapoint latents (a VAE's codes) get one
    row each, so the cost does not grow with draws x data points x elements of a table. With
    ``per_point=False`` they are only named (no draws for them at all: the summary written after
    training stays cheap; ``ppdgm diagnose`` gives the per-point summary).
    """
    from ppdgm.diagnostics import latent_draws, per_point_summary, posterior_data, split_latents

    if fit.engine in ("pcd", "greedy"):
        import arviz as az  # imported only where a table is made: it costs seconds

        if not fit.samples or "chain_energy" not in fit.samples:
            return "no chain energies recorded (the run was shorter than record_every)\n"
        idata = fit.to_arviz()
        return "persistent chains (energy of each recorded chain):\n" + az.summary(idata).to_string() + "\n"
    if fit.model is None or (fit.guide is None and not fit.samples):
        return "no latent variables: the model was fit without a posterior (see loss.png and evaluate)\n"
    global_, local = split_latents(fit)
    if var_names:
        unknown = sorted(set(var_names) - set(global_) - set(local))
        if unknown:
            raise ValueError(f"--var: no latent site(s) {unknown}; the fit's latents are {sorted(global_ + local)}")
        global_, local = [v for v in global_ if v in var_names], [v for v in local if v in var_names]
    if not global_ and not local:
        return "no latent variables: the model was fit by maximum likelihood (see loss.png and evaluate)\n"
    draws = latent_draws(fit, global_ + (local if per_point else []), num_samples)
    text = ""
    if global_:
        import arviz as az

        idata = posterior_data({k: v for k, v in draws.items() if k in global_})
        table = az.summary(idata, kind="all" if fit.samples else "stats")
        text += table.to_string(max_rows=max_rows) + "\n"
        if len(table) > max_rows:
            text += f"({len(table)} rows; --max-rows shows more, --var picks variables)\n"
    if local and not per_point:
        text += f"per-datapoint latents {', '.join(local)}: summarized per point by `ppdgm diagnose`\n"
    elif local:
        text += "per-datapoint latents (one row each; spread over points):\n"
        text += per_point_summary({k: v for k, v in draws.items() if k in local})
    return text


def convergence_warnings(fit, tail: float = 0.2) -> list[str]:
    """Why this fit may not have converged, as sentences (empty when nothing is wrong).

    Training: the loss still falls over the last ``tail`` of the run by more than its noise (the
    mean of the last tenth against the tenth before it, against their standard error). Samplers:
    R-hat > 1.01, divergences, bulk ESS under 100 for global latents.
    """
    import numpy as np

    out = []
    loss = np.asarray(fit.history.get("loss") or [], dtype=float)
    if fit.engine != "adversarial" and len(loss) >= 50 and np.isfinite(loss).all():
        k = max(5, int(len(loss) * tail / 2))
        before, last = loss[-2 * k : -k], loss[-k:]
        drop = before.mean() - last.mean()
        noise = np.sqrt(before.var(ddof=1) / k + last.var(ddof=1) / k)
        if drop > 3 * noise and drop > 1e-3 * abs(last.mean()):
            out.append(
                f"the loss is still falling over the last {2 * k} of {len(loss)} steps "
                f"({before.mean():.4g} -> {last.mean():.4g}); the fit has not converged: "
                f"train longer or with a larger learning rate (--steps, --lr)"
            )
    if fit.samples and fit.engine not in ("pcd", "greedy"):
        import arviz as az

        global_ = {k: v for k, v in fit.samples.items() if v[0, 0].numel() <= 64}
        chains, draws = next(iter(fit.samples.values())).shape[:2]
        if global_ and chains > 1 and draws > 3:
            from ppdgm.diagnostics import posterior_data

            ds = posterior_data(global_)
            rhat = float(max(np.nanmax(az.rhat(ds)[k].values) for k in global_))
            ess = float(min(np.nanmin(az.ess(ds)[k].values) for k in global_))
            if rhat > 1.01:
                out.append(f"R-hat up to {rhat:.3f} (> 1.01): the chains disagree; draw more (num_warmup/num_samples)")
            if ess < 100:
                out.append(f"bulk ESS as low as {ess:.0f} (< 100): too few effective draws for reliable estimates")
        stats = (fit.extra.get("tensors") or {}).get("sample_stats") or {}
        if "diverging" in stats:
            n = int(torch.as_tensor(stats["diverging"]).sum())
            if n:
                out.append(
                    f"{n} divergent transitions: the posterior is hard to explore; raise target_accept "
                    f"or reparameterize"
                )
    return out


def diagnose_text(fit, var_names=None, num_samples: int = 200, max_rows: int = 40, progress=None) -> str:
    """What ``ppdgm diagnose`` prints: the run, the summary of its latents, its convergence."""
    hist = fit.history
    text = ""
    if hist.get("loss"):
        tail = hist["loss"][-max(1, len(hist["loss"]) // 10) :]
        text += f"{fit.engine}: {len(hist['loss'])} steps, final loss {sum(tail) / len(tail):.4g} (mean of last 10%)\n"
    return text + summary_text(fit, max_rows=max_rows, num_samples=num_samples, var_names=var_names)


def write_fit_report(fit, out) -> list[str]:
    """Write loss.png, samples.png (or density.png over the data, for 2-D densities) and summary.txt
    with its convergence warnings into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if fit.history.get("loss"):
        plot_fit_history(fit, out / "loss.png")
        written.append("loss.png")
    module = fit.module
    data = fit.args[0] if fit.args and torch.is_tensor(fit.args[0]) else None
    if module is not None:
        try:
            with torch.no_grad():
                draws = module.sample(64)
        except (TypeError, ValueError):  # a conditional model (a BNN needs inputs x) has no grid
            draws = None
        if draws is not None:
            save_image_grid(draws, out / "samples.png")
            written.append("samples.png")
        if (
            fit.engine in DENSITY_ENGINES
            and data is not None
            and data.dim() == 2
            and data.shape[1] == 2
            and callable(getattr(module, "log_likelihood", None))
        ):
            plot_density_over_data(module, data, out / "density.png")
            written.append("density.png")
    if fit.model is not None and (fit.guide is not None or fit.samples):
        text = summary_text(fit, per_point=False)
        warnings = convergence_warnings(fit)
        if warnings:
            text += "".join(f"WARNING: {w}\n" for w in warnings)
        (out / "summary.txt").write_text(text)
        written.append("summary.txt")
    return written
