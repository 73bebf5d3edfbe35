"""An exponential moving average of a model's weights (``train_prior.py --prior_ema_decay 0.999``), saved with every
checkpoint.

The average is torch's ``AveragedModel`` with its EMA update (no hand-written averaging). It is not given to
``accelerator.prepare`` (nothing in it trains) nor registered with ``register_for_checkpointing``: accelerate would
pickle it and load it back with ``weights_only=False`` (code execution on ``--resume``, the reason vqgen keeps its
schedulers as JSON). Instead accelerate's save/load hooks write and read ``weights_ema.safetensors`` in the
checkpoint folder, so ``--resume`` continues the average bitwise.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError

FILE = "weights_ema.safetensors"


class WeightsEMA:
    def __init__(self, loop, decay: float):
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.acc = loop.accelerator
        # Parameters only: the prior has no trained buffers, and sampling adds KV-cache buffers to whichever model it
        # runs (use_buffers=True would then pair the wrong tensors). n_averaged counts updates (the first copies).
        self.averaged = AveragedModel(loop.unwrapped_model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
        self.acc.register_save_state_pre_hook(self._save)
        self.acc.register_load_state_pre_hook(self._load)

    @property
    def model(self) -> nn.Module:
        return self.averaged.module

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)

    def _save(self, models, weights, output_dir: str) -> None:
        if self.acc.is_main_process:
            state = {k: v.detach().contiguous().cpu() for k, v in self.averaged.state_dict().items()}
            save_file(state, str(Path(output_dir) / FILE))

    def _load(self, models, input_dir: str) -> None:
        path = Path(input_dir) / FILE
        if not path.is_file():
            raise CheckpointError(f"{input_dir} has no {FILE}: it was saved without --prior_ema_decay; resume "
                                  f"with --prior_ema_decay 0 or start a new run")
        self.averaged.load_state_dict({k: v.to(self.acc.device) for k, v in load_file(str(path)).items()})
