"""VQGAN loss terms for the tokenizer: hinge losses, ``disc_start`` gating, the adaptive weight, LPIPS.

The adaptive weight (norm ratio of the reconstruction's and the adversarial term's gradients at the decoder's output
layer) makes the adversarial term pull on that layer as hard as the reconstruction, whatever the two losses' scales.
LPIPS comes from the ``lpips`` package, and its VGG-16 backbone is never downloaded: without the file
:class:`PerceptualLoss` raises a ConfigError at once (``random_backbone=True`` is for tests of the code path only).
The formulas: docs/NOTES.md.
Adapted from: taming-transformers ``taming/modules/losses/vqperceptual.py`` (``hinge_d_loss``, ``adopt_weight``,
``calculate_adaptive_weight``); LlamaGen ``tokenizer/tokenizer_image/vq_loss.py``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config.parts import DISC_LOSSES, VGG16_FILE  # noqa: F401 (DISC_LOSSES: the losses defined here)
from ..errors import ConfigError


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def disc_factor(step: int, disc_start: int) -> float:
    """0 before ``disc_start`` optimizer steps, 1 from then on (taming's ``adopt_weight``)."""
    return 1.0 if step >= disc_start else 0.0


def last_layer_grads(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """(2, *last_layer.shape): d nll / d last and d g_loss / d last, the graph kept for the real backward.

    Separate from :func:`adaptive_weight` so that several processes can average the two gradients first (the
    global batch's gradients, as one process with the whole batch would see them)."""
    g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return torch.stack([g_nll, g_gan]).detach()


def adaptive_weight(grads: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """``||grads[0]|| / (||grads[1]|| + 1e-4)`` clamped to [0, max_weight]: a detached scalar."""
    return (grads[0].norm() / (grads[1].norm() + 1e-4)).clamp(0.0, max_weight).detach()


class PerceptualLoss(nn.Module):
    """LPIPS (VGG) distance between images in [-1, 1], averaged over the batch; 1-channel inputs are repeated to RGB.

    ``backbone``: path of torchvision's VGG-16 weights (default: the torch hub cache). ``random_backbone``: random
    VGG and linear heads, for testing the code path without weights (never for training a real model).
    """

    def __init__(self, backbone: str | Path | None = None, random_backbone: bool = False):
        super().__init__()
        path = None
        if not random_backbone:  # the cheap check first: a missing file fails before the import
            path = Path(backbone) if backbone else Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
            if not path.is_file():
                raise ConfigError(f"--perceptual_weight: LPIPS needs torchvision's VGG-16 weights at {path} "
                                  f"({VGG16_FILE}); vqgen never downloads weights. Copy the file there (or pass "
                                  f"--lpips_weights FILE), or train without it (--perceptual_weight 0)")
        try:
            import lpips
        except ModuleNotFoundError:
            raise ConfigError("--perceptual_weight needs the 'lpips' package: pip install \"vqgen[perceptual]\"") \
                from None
        # pnet_rand: lpips would otherwise ask torchvision to download the backbone; vqgen loads the file itself.
        with warnings.catch_warnings():  # lpips 0.1.4 calls torchvision with the deprecated `pretrained=`
            warnings.simplefilter("ignore", UserWarning)
            self.net = lpips.LPIPS(net="vgg", pretrained=not random_backbone, pnet_rand=True, verbose=False)
        if path is not None:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            _load_vgg_slices(self.net.net, {k[len("features."):]: v for k, v in state.items()
                                            if k.startswith("features.")})
        self.net.eval().requires_grad_(False)

    def train(self, mode: bool = True):  # a frozen metric network: always in eval mode
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)  # (B, 3, H, W)
        return self.net(x.float(), y.float(), normalize=False).mean()


def _load_vgg_slices(vgg: nn.Module, features: dict) -> None:
    """lpips' ``vgg16`` splits torchvision's ``features`` Sequential into slice1..slice5 keeping the layer indices;
    load the file's ``features.<i>.*`` tensors into them."""
    loaded = 0
    for name, module in vgg.named_children():
        if not name.startswith("slice"):
            continue
        for idx, layer in module.named_children():
            for pname, p in layer.named_parameters(recurse=False):
                key = f"{idx}.{pname}"
                if key not in features or features[key].shape != p.shape:
                    raise ConfigError(f"the VGG-16 weights file lacks a matching 'features.{key}'")
                with torch.no_grad():
                    p.copy_(features[key])
                loaded += 1
    if loaded == 0:
        raise ConfigError("VGG-16 weights: no layer loaded (unexpected lpips version?)")
