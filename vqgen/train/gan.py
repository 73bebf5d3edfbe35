"""The VQGAN terms of stage 1 (``--disc_weight``, ``--perceptual_weight``): a PatchGAN with its own optimizer, LPIPS.

One backward trains both models: the task returns ``nll + f * w * disc_weight * g_loss + vq_loss + f * d_loss``
(``f = [step >= disc_start]``), the generator's term computed through the discriminator's *detached* parameters
(``torch.func.functional_call``), so each model gets exactly its own gradients and the loop steps both optimizers
(LlamaGen's simultaneous update). The discriminator is a second prepared model, checkpointed with its optimizer
(bitwise resume); the adaptive weight uses gradients averaged over the processes. DeepSpeed and fp16 are refused
(:func:`vqgen.launch.check_extra_models`). Why: docs/NOTES.md.
Adapted from: taming-transformers ``taming/modules/losses/vqperceptual.py`` (``VQLPIPSWithDiscriminator``);
LlamaGen ``tokenizer/tokenizer_image/vq_loss.py`` and ``vq_train.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import GANConfig
from ..models import losses as L
from ..models.discriminator import PatchDiscriminator


class VQGANTerms:
    """The discriminator, its optimizer and the loss terms; :meth:`bind` gives it the prepared loop."""

    def __init__(self, cfg: GANConfig, in_channels: int, seed: int):
        self.cfg, self.disc = cfg, None
        if cfg.disc_weight > 0:
            # Its own seeded RNG: the VQ-VAE's random stream (codebook init, dead-code restarts) is the plain
            # recipe's, so a run is bitwise the plain VQ-VAE's until --disc_start.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 1)
                self.disc = PatchDiscriminator(in_channels, cfg.disc_channels, cfg.disc_layers, cfg.disc_norm)
        # Built now: missing LPIPS weights fail before the run folder is touched.
        self.perceptual = L.PerceptualLoss(cfg.lpips_weights) if cfg.perceptual_weight > 0 else None
        self.loop = None
        self.prepared_disc: nn.Module | None = None

    @property
    def modules(self) -> list[nn.Module]:
        """Trained modules besides the VQ-VAE (the loop prepares them)."""
        return [self.disc] if self.disc is not None else []

    def optimizers(self, train, device_type: str) -> list[torch.optim.Optimizer]:
        if self.disc is None:
            return []
        return [self.disc.configure_optimizer(self.cfg.disc_lr or train.lr, 0.0, device_type)]

    def bind(self, loop, prepared: list[nn.Module]) -> None:
        self.loop = loop
        self.prepared_disc = prepared[0] if prepared else None
        if self.perceptual is not None:
            self.perceptual.to(loop.accelerator.device)

    def loss(self, x: torch.Tensor, recon: torch.Tensor, rec: torch.Tensor, last_layer: torch.Tensor,
             logs: dict) -> torch.Tensor:
        """``x``, ``recon``: (B, C, H, W) fp32; ``rec``: the reconstruction loss. Returns everything but vq_loss."""
        cfg = self.cfg
        nll = rec
        if self.perceptual is not None:
            p = self.perceptual(recon, x)
            nll = nll + cfg.perceptual_weight * p
            logs["lpips"] = p.detach()
        if self.disc is None or L.disc_factor(self.loop.state.global_step, cfg.disc_start) == 0:
            return nll
        # The discriminator's term: its own (DDP) forward on real and detached fake images.
        logits_real, logits_fake = self.prepared_disc(x.detach()), self.prepared_disc(recon.detach())
        d_loss = L.hinge_d_loss(logits_real, logits_fake)
        # The generator's term: same weights, detached (no gradient into the discriminator, no DDP hooks).
        bare = self.loop.accelerator.unwrap_model(self.prepared_disc)
        frozen = {k: v.detach() for k, v in bare.named_parameters()}
        g_loss = L.hinge_g_loss(torch.func.functional_call(bare, frozen, (recon,)))
        w = torch.ones((), device=x.device)
        if not cfg.no_adaptive_weight:
            grads = L.last_layer_grads(nll, g_loss, last_layer)  # (2, *last_layer.shape)
            if self.loop.world_size > 1:
                grads = self.loop.accelerator.reduce(grads, "mean")
            w = L.adaptive_weight(grads)
        logs.update(d_loss=d_loss.detach(), g_loss=g_loss.detach(), adaptive_weight=w,
                    logits_real=logits_real.detach().mean(), logits_fake=logits_fake.detach().mean())
        return nll + w * cfg.disc_weight * g_loss + d_loss
