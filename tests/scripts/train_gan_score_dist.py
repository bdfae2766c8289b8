"""GAN (adversarial engine) or score model (denoising score matching) under torchrun.

usage: train_gan_score_dist.py OUT_DIR gan|score
Each rank saves its parameters to OUT_DIR/rank{R}.pt and its loss history to OUT_DIR/loss{R}.pt.
"""

import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
from ppdgm.data import load_dataset  # noqa: E402
from ppdgm.distributed import finish  # noqa: E402

out, family = Path(sys.argv[1]), sys.argv[2]
rank = int(os.environ.get("RANK", "0"))
data = load_dataset("8gaussians", n=512)
torch.manual_seed(rank)  # different initial weights per rank: the engine must broadcast rank 0's
if family == "gan":
    from ppdgm.inference.adversarial import Adversarial
    from ppdgm.models.gan import GAN

    obj = GAN.from_data(data, hidden_features=(32, 32), critic_hidden_features=(32, 32))
    fit = Adversarial(num_steps=15, batch_size=64, progress=False).run(obj.model, obj.critic, data.x)
else:
    from ppdgm.inference.score_matching import ScoreMatching
    from ppdgm.models.score import ScoreModel

    obj = ScoreModel.from_data(data, hidden_features=(32, 32))
    fit = ScoreMatching(num_steps=15, batch_size=64, progress=False).run(obj, data.x)
finish()
out.mkdir(parents=True, exist_ok=True)
torch.save({k: v.detach() for k, v in obj.state_dict().items()}, out / f"rank{rank}.pt")
torch.save(torch.tensor(fit.history["loss"]), out / f"loss{rank}.pt")
