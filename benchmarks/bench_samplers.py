"""Every generative family in the repo on digits, on one axis: likelihood where defined, sample quality.

Each family present in ``ppdgm.models.MODELS`` is built by ``from_data`` and trained by its default
engine with that engine's defaults (only the number of steps is set here, to keep the run to a
few minutes) and the family's suggested settings (``engine_config``), the way ``ppdgm fit``
does. Binary families (VAE, MADE, RBM, DBM) see binarized digits; continuous ones (GAN, EBM,
score) see the 17-level intensities dequantized once as ``(k + u) / 17``, and their test NLL is
the dequantization bound on the discrete image, ``-log P(k) <= -log p(v) + 64 log 17`` (Theis et
al. 2016). Flows take the 17-level pixels and dequantize them with fresh noise every step; their
NLL is the same bound, and their samples are dequantized like the data before they are scored.
Sample quality is measured against the test split in each family's own representation: MMD^2
(Gaussian kernels around the median distance), k-NN precision/recall (k = 3) and the Fréchet
distance in the features of the cached digits classifier; the "held-out data" rows (validation
split vs test split) are the floor a perfect sampler would reach. Every family is drawn by its
own ``sample(n)``, as ``ppdgm sample`` draws (a trained RBM's continues the persistent chains of
its training by 10 sweeps). Families missing from the repo are skipped with a note.

    OMP_NUM_THREADS=1 python benchmarks/bench_samplers.py [--quick] [--only gan,ebm,...]
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch

from ppdgm.data import Dataset, load_digits
from ppdgm.evaluate import bernoulli_baseline, digits_classifier, frechet_distance, mmd, precision_recall

LEVELS = 17
FAMILIES = [  # (MODELS name, data kind, steps)
    ("vae", "binary", 3000),
    ("made", "binary", 2000),
    ("rbm", "binary", 20000),  # its best length with its settings: 15.86 (12000: 15.97; 6000: 16.27)
    ("dbm", "binary", 20000),  # the same: 15.87 (12000: 15.97, 30000: 15.94); bench_dbm_vs_rbm: 3 seeds
    ("dbn", "binary", 2000),
    ("nade", "binary", 2000),
    ("flow", "dequantized", 1500),
    ("gan", "dequantized", 3000),
    ("ebm", "dequantized", 1000),
    ("score", "dequantized", 3000),
]
# Rows at another size than the family's default: (MODELS name, data kind, steps, from_data kwargs).
# The DBM (128 + 64 hidden) is compared with an RBM of its whole hidden budget as well.
SIZED = [("rbm", "binary", 20000, {"hidden_units": 192})]
# Families that dequantize 17-level pixels themselves (fresh noise every step, their NLL is the
# same bound): they train on the discrete pixels, and their samples are dequantized like the data.
DEQUANTIZE_THEMSELVES = {"flow"}


def dequantize_pixels(x: torch.Tensor, seed: int) -> torch.Tensor:
    k = (x * (LEVELS - 1)).round()
    return (k + torch.rand(k.shape, generator=torch.Generator().manual_seed(seed))) / LEVELS


def dequantize(ds: Dataset, seed: int) -> Dataset:
    return Dataset(dequantize_pixels(ds.x, seed), ds.y, ds.name.replace("continuous", "dequantized"), ds.image_shape)


def categorical_baseline(train: torch.Tensor, test: torch.Tensor) -> float:
    """Per-pixel 17-level categorical fitted on ``train`` (add-one smoothing): test NLL in nats."""
    k_tr, k_te = (train * (LEVELS - 1)).round().long(), (test * (LEVELS - 1)).round().long()
    counts = torch.stack([(k_tr == v).sum(0) for v in range(LEVELS)], 1).double() + 1
    logp = (counts / counts.sum(1, keepdim=True)).log()
    return float(-logp.gather(1, k_te.T).sum(0).mean())


def data_for(kind):
    if kind == "binary":
        return (
            load_digits("train", binarize=True),
            load_digits("valid", binarize=True),
            load_digits("test", binarize=True),
        )
    if kind == "discrete":
        return load_digits("train"), load_digits("valid"), load_digits("test")
    return (
        dequantize(load_digits("train"), 0),
        dequantize(load_digits("valid"), 1),
        dequantize(load_digits("test"), 2),
    )


def training_kind(name, kind):
    return "discrete" if kind == "dequantized" and name in DEQUANTIZE_THEMSELVES else kind


def train(name, kind, steps, **kwargs):
    obj, _, engine, seconds = train_fit(name, kind, steps, **kwargs)
    return obj, engine, seconds


def train_fit(name, kind, steps, seed=0, **kwargs):
    """The trained family, its Fit, the engine's name and the training time in seconds."""
    from ppdgm.families import fit_family, make_engine
    from ppdgm.models import model_class

    cls = model_class(name)
    tr, va, _ = data_for(training_kind(name, kind))
    torch.manual_seed(seed)
    obj = cls.from_data(tr, **kwargs)
    # the family's suggested engine settings beneath the step count, as `ppdgm fit` applies them
    engine = make_engine(obj, None, {"num_steps": steps, "seed": seed, "progress": False})
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = fit_family(obj, engine, tr, va)
    return obj, fit, engine.name, time.perf_counter() - t0


def draw(obj, n):
    """``n`` samples for the quality columns: the family's own ``sample(n)``, what ``ppdgm sample``
    gives. A trained RBM continues its persistent training chains, which after a decaying learning
    rate represent the model (6000 steps, 10 sampling seeds: Fréchet 2.5 +- 0.1 x floor after 10
    sweeps, vs 5.9 +- 0.2 by parallel tempering from noise, ``sample(n, from_chains=False)``)."""
    return obj.sample(n)


def test_nll(obj, kind, test):
    """Test NLL in nats, or ``(None, why)`` when the model has none or its estimate is not trustworthy."""
    if not hasattr(obj, "log_likelihood"):
        return None, "implicit model: no density"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ll = obj.log_likelihood(test.x)
    ais = getattr(obj, "last_ais", None)
    if ais is not None and ais["effective_sample_size"] < 10:
        return None, f"AIS log Z unreliable (ESS {ais['effective_sample_size']:.1f})"
    if kind == "dequantized" and getattr(obj, "levels", None) is None:
        ll = ll - test.x.shape[1] * math.log(LEVELS)  # density of v -> bound on P(k)
    # AIS underestimates log Z on average, so its NLL errs low; say how many chains carried it
    why = "" if ais is None else f"AIS log Z, ESS {ais['effective_sample_size']:.0f} of its chains"
    return float(-ll.double().mean()), why


def quality(real, fake):
    fake = fake.detach().float().cpu().clamp(0, 1)
    pr = precision_recall(real, fake, k=3)
    return mmd(real, fake).mmd2, pr.precision, pr.recall, frechet_distance(real, fake, features="digits")


def fmt(v, spec=".3f"):
    return "—" if v is None else format(v, spec)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the steps (smoke run)")
    parser.add_argument("--only", default=None, help="comma-separated MODELS names")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from ppdgm.models import MODELS

    digits_classifier()  # train or load the feature network before timing anything
    rows, notes = [], []
    floors = {}
    for kind in ("binary", "dequantized"):
        _, va, te = data_for(kind)
        floors[kind] = quality(te.x, va.x)
        tr = data_for(kind)[0]
        base = (
            bernoulli_baseline(tr.x, te.x).nll
            if kind == "binary"
            else categorical_baseline(load_digits("train").x, load_digits("test").x)
        )
        rows.append(("held-out data", "—", kind, base, *floors[kind], None, "per-pixel baseline NLL"))
    only = set(args.only.split(",")) if args.only else None
    for name, kind, steps, kwargs in [(*row, {}) for row in FAMILIES] + SIZED:
        if only and name not in only:
            continue
        if name not in MODELS:
            notes.append(f"{name}: not in this repo's MODELS registry; skipped")
            continue
        steps = max(10, steps // 10) if args.quick else steps
        label = name + "".join(f" ({v} {k.replace('_', ' ')})" for k, v in kwargs.items())
        try:
            obj, engine, seconds = train(name, kind, steps, **kwargs)
            te = data_for(kind)[2]
            torch.manual_seed(1)
            with torch.no_grad():
                fake = draw(obj, te.x.shape[0])
            if training_kind(name, kind) == "discrete":
                fake = dequantize_pixels(fake, 3)
                nll, why = test_nll(obj, "discrete", data_for("discrete")[2])
            else:
                nll, why = test_nll(obj, kind, te)
            note = f"{steps} steps" + (f"; {why}" if why else "")
            rows.append((label, engine, kind, nll, *quality(te.x, fake), seconds, note))
        except Exception as err:  # one family's failure must not hide the others' numbers
            notes.append(f"{label}: failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
        print(f"done {label}", flush=True)

    print()
    print(
        "| family | engine | data | test NLL (nats) | MMD² | precision | recall | Fréchet | Fréchet / floor | "
        "train s | note |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, engine, kind, nll, m, p, r, fd, secs, note in rows:
        floor = floors[kind][3]
        print(
            f"| {name} | {engine} | {kind} | {fmt(nll, '.2f')} | {m:.4f} | {p:.2f} | {r:.2f} | {fd:.2f} | "
            f"{fd / floor:.1f}x | {fmt(secs, '.1f')} | {note} |"
        )
    for note in notes:
        print(f"- {note}")
    print(
        "\nNLL: binary rows on binarized digits; dequantized rows bound -log P of the 17-level image; "
        "lower is better. Fréchet / floor: ratio to the held-out split's distance to the test split."
    )


if __name__ == "__main__":
    main()
