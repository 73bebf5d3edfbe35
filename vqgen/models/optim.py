"""The AdamW both models build in their ``configure_optimizer`` (nanoGPT's ``configure_optimizers``).

Weight decay applies to matrices and embeddings (parameters with 2+ dimensions), never to biases and norm gains.
The fused kernel (one pass over all tensors) is used on CUDA and, since torch 2.4, on CPU, where it is much cheaper
than the default per-tensor (foreach) step (docs/RESULTS.md, section 2b). Each model picks its own betas.
"""

from __future__ import annotations

import torch
from torch import nn


def adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
          device_type: str) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device_type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **({"fused": True} if fused else {}))
