"""Figures and text a fit leaves in its output folder: image grids, loss curves, ArviZ summaries."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def save_image_grid(x, path, image_shape=None, ncols: int | None = None, title: str | None = None) -> Path:
    """Save ``(n, d)`` samples to a PNG: square images as a grid, 2-D points as a scatter, other
    vectors (series windows) as lines."""
    x = torch.as_tensor(x).detach().cpu().float()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    side = int(math.isqrt(x[0].numel())) if x.dim() >= 2 else 0
    if x.dim() == 2 and x.shape[1] == 2:
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(x[:, 0], x[:, 1], s=3, alpha=0.5)
        ax.set_aspect("equal")
    elif image_shape is None and x.dim() == 2 and side * side != x.shape[1]:  # series, not images
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot(x[: min(len(x), 16)].T, lw=0.8, alpha=0.7)
        ax.set_xlabel("time step")
    else:
        n = x.shape[0]
        if image_shape is None:
            if side * side != x[0].numel():
                raise ValueError(f"cannot show {x[0].numel()}-dim samples as square images; pass image_shape")
            image_shape = (side, side)
        ncols = ncols or int(math.ceil(math.sqrt(n)))
        nrows = int(math.ceil(n / ncols))
        fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * 0.6, nrows * 0.6), squeeze=False)
        for i, ax in enumerate(axes.flat):
            ax.axis("off")
            if i < n:
                ax.imshow(x[i].reshape(image_shape).clamp(0, 1), cmap="gray_r", vmin=0, vmax=1)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_history(history: dict, path, keys=("loss", "val_loss")) -> Path:
    """Training curves of the named history entries (validation plotted at its own steps)."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key in keys:
        values = history.get(key)
        if not values:
            continue
        steps = history.get("val_step") if key == "val_loss" else range(1, len(values) + 1)
        ax.plot(list(steps), values, label=key, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (negative ELBO)" if "loss" in history else "")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def summary_text(fit, max_elements: int = 64, num_samples: int = 500) -> str:
    """``az.summary`` of the fit's latent variables with at most ``max_elements`` entries each."""
    import arviz as az

    idata = fit.to_arviz(num_samples=num_samples, log_likelihood=False)
    names = [k for k, v in idata.posterior.data_vars.items() if v[0, 0].size <= max_elements]
    if not names:
        return "no latent variable small enough to summarize\n"
    return az.summary(idata, var_names=names).to_string() + "\n"


def write_fit_report(fit, out) -> list[str]:
    """Write loss.png, samples.png and summary.txt (where they apply) into ``out``."""
    out = Path(out)
    written = []
    if fit.history.get("loss"):
        plot_history(fit.history, out / "loss.png")
        written.append("loss.png")
    module = fit.module
    if module is not None and hasattr(module, "sample"):
        try:
            with torch.no_grad():
                draws = module.sample(64)
        except (TypeError, ValueError):  # a conditional model (a BNN needs inputs x) has no grid
            draws = None
        if draws is not None:
            save_image_grid(draws, out / "samples.png")
            written.append("samples.png")
    if fit.guide is not None or fit.samples:
        try:
            text = summary_text(fit)
        except ValueError as err:  # e.g. a model without latent sites
            text = f"{err}\n"
        (out / "summary.txt").write_text(text)
        written.append("summary.txt")
    return written
