"""An RBM trained by persistent CD, under torchrun or as one process.

usage: train_rbm_dist.py OUT_DIR STEPS BATCH CHAIN_BLOCKS
Rank 0 saves the fit to OUT_DIR.
"""

import os
import sys

import torch

torch.set_num_threads(1)
from ppdgm.data import load_digits  # noqa: E402
from ppdgm.distributed import finish  # noqa: E402
from ppdgm.inference.pcd import PersistentCD  # noqa: E402
from ppdgm.models.rbm import RBM  # noqa: E402

out, steps, batch, blocks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
rbm = RBM(features=64, hidden_units=32)
x = load_digits("train", binarize=True).x[:480]
fit = PersistentCD(
    num_steps=steps,
    batch_size=batch,
    lr=0.05,
    k=1,
    num_chains=40,
    chain_blocks=blocks,
    record_chains=4,
    seed=5,
    progress=False,
).run(rbm, x)
finish()
if int(os.environ.get("RANK", "0")) == 0:
    fit.save(out)
