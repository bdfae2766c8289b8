"""Train PPCA by minibatch SVI with checkpoints; used by the resume test.

usage: train_ppca.py OUT_DIR STEPS [--kill-at STEP] [--resume]
"""

import os
import signal
import sys

import torch

torch.set_num_threads(1)

from ppdgm.data import load_digits  # noqa: E402
from ppdgm.inference import SVI  # noqa: E402
from ppdgm.models.ppca import PPCA  # noqa: E402

out, steps = sys.argv[1], int(sys.argv[2])
kill_at = int(sys.argv[sys.argv.index("--kill-at") + 1]) if "--kill-at" in sys.argv else None


def die(step, info):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)


torch.manual_seed(0)
model = PPCA(features=64, latent_features=4)
x = load_digits("train").x[:400]
fit = SVI(num_steps=steps, batch_size=50, lr=0.02, checkpoint_every=10, seed=1, progress=False).run(
    model.model, model.guide, x, checkpoint_dir=out, resume="--resume" in sys.argv, callbacks=[die]
)
fit.module, fit.spec = model, model.spec
fit.save(out)
