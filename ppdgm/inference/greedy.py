"""Greedy layer-wise training of a stack of RBMs (a DBN), each by persistent CD.

Hinton, Osindero & Teh (2006): train the bottom RBM on the data, draw its hidden units given each
data point, train the next RBM on those draws, and so on. The model opts in with ``stack`` (the
RBMs, bottom first) and ``up(x)`` (the recognition pass); every RBM gets this engine's
:class:`PersistentCD` configuration (it takes the same arguments) and a seed of its own.
"""

from __future__ import annotations

import time

import torch

from ppdgm.fit import Fit
from ppdgm.inference.base import set_seed, step_timing
from ppdgm.inference.callbacks import Callback, as_callbacks
from ppdgm.inference.pcd import PersistentCD


class _StopsTheStack(Callback):
    """Forwards a user's callback to each layer's run and remembers whether it stopped one, so a
    stop ends the whole stack (a resumed run then picks up in that layer)."""

    def __init__(self, callback: Callback):
        self.callback, self.stopped = callback, False

    def on_start(self, config):
        self.callback.on_start(config)

    def on_step(self, step, info):
        stop = bool(self.callback.on_step(step, info))
        self.stopped |= stop
        return stop

    def on_validation(self, step, metrics):
        stop = bool(self.callback.on_validation(step, metrics))
        self.stopped |= stop
        return stop

    def on_end(self, fit):
        self.callback.on_end(fit)


class GreedyLayerwise(PersistentCD):
    """``GreedyLayerwise(**PersistentCD arguments)``: the same PCD settings for every layer."""

    name = "greedy"
    input = "layers"

    def _pcd_arguments(self) -> dict:
        import inspect

        names = inspect.signature(PersistentCD.__init__).parameters
        return {k: getattr(self, k) for k in names if k != "self" and hasattr(self, k)}

    def run(self, model, data, *, val_data=None, checkpoint_dir=None, resume: bool = False, callbacks=()) -> Fit:
        """Train ``model.stack`` bottom-up; checkpoints of layer ``k`` go to ``checkpoint_dir/layer{k}``."""
        stack = getattr(model, "stack", None)
        if not isinstance(model, torch.nn.Module) or stack is None or not callable(getattr(model, "up", None)):
            raise TypeError(
                f"model must be a torch.nn.Module with a `stack` of RBMs and an `up(x)` recognition "
                f"pass (a DBN), got {type(model).__name__}"
            )
        check = getattr(model, "check_data", None)
        x = check(data, "data") if check else data
        vx = check(val_data, "val_data") if (check and val_data is not None) else val_data
        callbacks = [_StopsTheStack(cb) for cb in as_callbacks(callbacks)]
        t0 = time.perf_counter()
        history, chains = {}, {}
        seed = self.seed
        for k, rbm in enumerate(stack):
            layer_dir = None if checkpoint_dir is None else f"{checkpoint_dir}/layer{k}"
            engine = PersistentCD(**{**self._pcd_arguments(), "seed": None if seed is None else seed + k})
            fit = engine.run(rbm, x, val_data=vx, checkpoint_dir=layer_dir, resume=resume, callbacks=callbacks)
            history[f"layer{k}"] = fit.history
            chains[f"layer{k}"] = fit.extra["tensors"]["chains"]
            if any(cb.stopped for cb in callbacks):
                break
            if k + 1 < len(stack):
                set_seed(None if seed is None else seed + 1000 + k)
                with torch.no_grad():
                    x = torch.bernoulli(rbm.hidden_mean(x))
                    vx = torch.bernoulli(rbm.hidden_mean(vx)) if vx is not None else None
        model.to(x.device)  # every layer where the data is
        seconds = time.perf_counter() - t0
        steps = sum(len(h["loss"]) for h in history.values())
        # the top RBM's persistent chains stand for the whole model's negative phase
        return Fit(
            engine=self.name,
            config=self.config,
            history={"loss": [v for h in history.values() for v in h["loss"]], "layers": history},
            timing=step_timing(seconds, steps),
            samples={"chain_energy": fit.samples["chain_energy"]} if fit.samples else None,
            spec=getattr(model, "spec", None),
            extra={"tensors": {"chains": chains}},
            model=getattr(model, "model", None),
            guide=getattr(model, "guide", None),
            module=model,
        )
