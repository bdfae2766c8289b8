"""Data that ships (scikit-learn's digits, 2-D toys), readers for a user's own data, validation.

The digits split is fixed: a permutation drawn with seed 0 gives 1,200 training, 300 validation
and 297 test images. ``binarize=True`` thresholds pixel intensities at 8/16 (deterministic, so
likelihoods are comparable between runs and families).
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import DTypeLike

DIGITS_SPLIT = {"train": 1200, "valid": 300, "test": 297}
SUPPORTS = ("real", "unit_interval", "binary", "counts")


@dataclass(frozen=True)
class Dataset:
    """A split of images or points: ``x`` is ``(n, d)`` float, ``y`` integer labels or None."""

    x: torch.Tensor
    y: torch.Tensor | None
    name: str
    image_shape: tuple[int, int] | None = None

    def __len__(self) -> int:
        return self.x.shape[0]


def check_data(x, name: str = "data", support: str = "real", rank: int | None = None) -> torch.Tensor:
    """Return ``x`` as a float tensor or raise ``ValueError`` saying what was expected and what came.

    ``support`` is what the likelihood needs: ``real``, ``unit_interval`` ([0, 1]),
    ``binary`` ({0, 1}) or ``counts`` (non-negative integers).
    """
    if support not in SUPPORTS:
        raise ValueError(f"support must be one of {SUPPORTS}, got {support!r}")
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            raise ValueError(f"{name}: expected a numeric array, got dtype object")
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.is_complex() or x.dtype == torch.bool:
        x = x.float() if x.dtype == torch.bool else x
        if x.is_complex():
            raise ValueError(f"{name}: expected real values, got dtype {x.dtype}")
    if not x.is_floating_point():
        x = x.float()
    if rank is not None and x.dim() != rank:
        raise ValueError(f"{name}: expected a rank-{rank} array, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty array, got shape {tuple(x.shape)}")
    bad = ~torch.isfinite(x)
    if bad.any():
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}: expected finite values, got {int(bad.sum())} NaN/inf (first at index {where})")
    if support == "unit_interval" and (x.min() < 0 or x.max() > 1):
        raise ValueError(
            f"{name}: expected values in [0, 1] for this likelihood, got range [{x.min():.4g}, {x.max():.4g}]"
        )
    if support == "binary" and not ((x == 0) | (x == 1)).all():
        off = x[(x != 0) & (x != 1)][0].item()
        raise ValueError(f"{name}: expected binary values in {{0, 1}} for a Bernoulli likelihood, got e.g. {off:.4g}")
    if support == "counts" and ((x < 0).any() or (x != x.round()).any()):
        raise ValueError(f"{name}: expected non-negative integer counts, got range [{x.min():.4g}, {x.max():.4g}]")
    return x


def _digits_arrays():
    """Read the digits table scikit-learn ships, without importing ``sklearn.datasets``: that import
    takes about two seconds, at least one of them spent on nothing else a ``ppdgm`` command needs."""
    spec = importlib.util.find_spec("sklearn")
    where = spec.submodule_search_locations if spec else None
    table = Path(where[0]) / "datasets" / "data" / "digits.csv.gz" if where else None
    if table is not None and table.is_file():
        rows = np.loadtxt(table, delimiter=",", dtype=np.float32)
        return rows[:, :-1] / 16.0, rows[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.data.astype(np.float32) / 16.0, bunch.target.astype(np.int64)


def load_digits(split: str = "train", binarize: bool = False) -> Dataset:
    """scikit-learn's 1,797 handwritten 8x8 digits as ``(n, 64)`` in [0, 1] (or {0, 1}) with labels.

    ``split`` is ``train`` (1,200), ``valid`` (300), ``test`` (297) or ``all``.
    """
    if split not in (*DIGITS_SPLIT, "all"):
        raise ValueError(f"split must be one of {(*DIGITS_SPLIT, 'all')}, got {split!r}")
    x, y = _digits_arrays()
    if binarize:
        x = (x >= 0.5).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    if split != "all":
        start = 0
        for name, size in DIGITS_SPLIT.items():
            if name == split:
                order = order[start : start + size]
                break
            start += size
    kind = "binary" if binarize else "continuous"
    return Dataset(torch.from_numpy(x[order]), torch.from_numpy(y[order]), f"digits-{kind}-{split}", (8, 8))


# ---------------------------------------------------------------------------------------------
# 2-D toy sets


def _rng(seed):
    return np.random.default_rng(seed)


def make_moons(n: int = 1000, noise: float = 0.05, seed: int = 0) -> torch.Tensor:
    from sklearn.datasets import make_moons as sk_moons

    x, _ = sk_moons(n_samples=n, noise=noise, random_state=seed)
    return torch.as_tensor(x, dtype=torch.float32)


def make_rings(n: int = 1000, noise: float = 0.05, seed: int = 0, radii=(1.0, 2.0, 3.0)) -> torch.Tensor:
    rng = _rng(seed)
    r = rng.choice(np.asarray(radii), size=n)
    t = rng.uniform(0, 2 * math.pi, size=n)
    x = np.stack([r * np.cos(t), r * np.sin(t)], 1) + noise * rng.standard_normal((n, 2))
    return torch.as_tensor(x, dtype=torch.float32)


def make_pinwheel(n: int = 1000, arms: int = 5, seed: int = 0, radial_sd=0.3, tangential_sd=0.1, rate=0.25):
    """Johnson et al. (2016) pinwheel: ``arms`` curved clusters."""
    rng = _rng(seed)
    labels = rng.integers(0, arms, size=n)
    feats = rng.standard_normal((n, 2)) * np.array([radial_sd, tangential_sd])
    feats[:, 0] += 1.0
    angles = 2 * math.pi * labels / arms + rate * np.exp(feats[:, 0])
    c, s = np.cos(angles), np.sin(angles)
    x = np.stack([c * feats[:, 0] - s * feats[:, 1], s * feats[:, 0] + c * feats[:, 1]], 1)
    return torch.as_tensor(2 * x, dtype=torch.float32)


def make_checkerboard(n: int = 1000, seed: int = 0) -> torch.Tensor:
    rng = _rng(seed)
    x1 = rng.uniform(-4, 4, size=n)
    x2 = rng.uniform(0, 2, size=n) - 2 * rng.integers(0, 2, size=n) + 2 * (np.floor(x1 / 2) % 2)
    x2 = x2 - 2  # centre on zero
    return torch.as_tensor(np.stack([x1, x2], 1), dtype=torch.float32)


def make_gaussian_mixture(n: int = 1000, modes: int = 8, radius: float = 2.0, sd: float = 0.1, seed: int = 0):
    """``modes`` Gaussians on a circle (the usual mode-coverage test). Returns ``(x, centres)``."""
    rng = _rng(seed)
    t = 2 * math.pi * np.arange(modes) / modes
    centres = radius * np.stack([np.cos(t), np.sin(t)], 1)
    k = rng.integers(0, modes, size=n)
    x = centres[k] + sd * rng.standard_normal((n, 2))
    return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(centres, dtype=torch.float32)


TOYS: dict[str, Callable[..., torch.Tensor]] = {
    "moons": make_moons,
    "rings": make_rings,
    "pinwheel": make_pinwheel,
    "checkerboard": make_checkerboard,
    "8gaussians": lambda n=1000, seed=0: make_gaussian_mixture(n, seed=seed)[0],
}

SERIES_SPLIT = {"train": 0.6, "valid": 0.2, "test": 0.2}
"""Fractions of a series, in time order: a forecaster is validated and tested on later years."""


def load_sunspots(split: str = "train") -> Dataset:
    """Yearly mean sunspot numbers 1700-2008 (309 values, shipped with statsmodels) as a series
    ``x`` of shape ``(T,)``, split by time: train the first 60%, valid the next 20%, test the last."""
    if split not in (*SERIES_SPLIT, "all"):
        raise ValueError(f"split must be one of {(*SERIES_SPLIT, 'all')}, got {split!r}")
    try:
        from statsmodels.datasets import sunspots
    except ImportError:
        raise ValueError(
            "the sunspots dataset ships with statsmodels, which is not installed: pip install statsmodels"
        ) from None
    series = torch.tensor(sunspots.load_pandas().data["SUNACTIVITY"].to_numpy(), dtype=torch.float32)
    if split == "all":
        return Dataset(series, None, "sunspots-all")
    cuts = np.cumsum([0, *SERIES_SPLIT.values()]) * len(series)
    i = list(SERIES_SPLIT).index(split)
    return Dataset(series[int(cuts[i]) : int(cuts[i + 1])], None, f"sunspots-{split}")


DATASETS = ("digits", "digits-binary", *TOYS, "sunspots")


def load_dataset(name: str, split: str = "train", n: int = 2000) -> Dataset:
    """A named bundled dataset: ``digits``, ``digits-binary`` or a 2-D toy (split seeds differ)."""
    if name == "digits":
        return load_digits(split)
    if name == "digits-binary":
        return load_digits(split, binarize=True)
    if name == "sunspots":
        return load_sunspots(split)
    if name in TOYS:
        seeds = {"train": 0, "valid": 1, "test": 2, "all": 0}
        if split not in seeds:
            raise ValueError(f"split must be one of {tuple(seeds)}, got {split!r}")
        return Dataset(TOYS[name](n=n, seed=seeds[split]), None, f"{name}-{split}")
    if os.path.exists(name):
        return Dataset(read_array(name), None, Path(name).stem)
    raise ValueError(f"data must be one of {DATASETS} or a path to a .npy/.csv/IDX file, got {name!r}")


# ---------------------------------------------------------------------------------------------
# readers for a user's own data

_IDX_TYPES: dict[int, DTypeLike] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> np.ndarray:
    """Read an MNIST-style IDX file (optionally gzipped) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: expected an IDX file (magic 0x0000TTNN), got first bytes {raw[:4].hex()}")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_TYPES:
        raise ValueError(f"{path}: unknown IDX data type 0x{code:02x}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[code])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise ValueError(f"{path}: header says shape {dims} ({expected} bytes), file holds {len(raw) - offset}")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


def load_mnist(folder, split: str = "train", binarize: bool = False) -> Dataset:
    """MNIST (or Fashion-MNIST) from IDX files in a local folder; pixels scaled to [0, 1]."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(folder)

    def find(kind):
        for suffix in ("", ".gz"):
            for sep in ("-", "."):
                p = folder / f"{prefix}-{kind}{sep}idx{'3' if kind == 'images' else '1'}-ubyte{suffix}"
                if p.exists():
                    return p
        raise FileNotFoundError(f"no {prefix}-{kind}-idx*-ubyte[.gz] in {folder}")

    images = read_idx(find("images")).astype(np.float32) / 255.0
    labels = read_idx(find("labels")).astype(np.int64)
    if images.ndim != 3 or len(images) != len(labels):
        raise ValueError(f"{folder}: expected images (n, h, w) and n labels, got {images.shape} and {labels.shape}")
    x = images.reshape(len(images), -1)
    if binarize:
        x = (x >= 0.5).astype(np.float32)
    return Dataset(torch.from_numpy(x), torch.from_numpy(labels), f"mnist-{split}", images.shape[1:])


def read_array(path) -> torch.Tensor:
    """Read ``.npy``, ``.csv`` (comma-separated, optional header row) or IDX into a float tensor."""
    path = str(path)
    if path.endswith(".npy"):
        arr = np.load(path, allow_pickle=False)
    elif path.endswith(".csv"):
        with open(path) as f:
            first = f.readline()
        try:
            [float(v) for v in first.strip().split(",")]
            skip = 0
        except ValueError:
            skip = 1
        arr = np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2)
    elif "idx" in os.path.basename(path):
        arr = read_idx(path)
        arr = arr.reshape(len(arr), -1)
    else:
        raise ValueError(f"expected a .npy, .csv or IDX file, got {path!r}")
    return check_data(torch.as_tensor(np.asarray(arr, dtype=np.float32)), name=path)
