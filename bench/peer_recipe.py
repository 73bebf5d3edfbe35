"""The original tool's recipe (GenerativeZoo ``VQVAE_T.py``) re-implemented on MONAI 1.6.1, for bench/quality.py.

Step for step what ``models/AR/VQVAE_Transformer.py`` does: MONAI ``VQVAE`` + ``DecoderOnlyTransformer`` in raster
order, Adam, L1 then cross-entropy, best-epoch checkpoints, BOS-token sampling at temperature 1, and its bug (the
VQ-VAE left in train mode while the prior trains moves its EMA codebook); ``frozen=True`` fixes the bug and nothing
else. Each stage stops at its wall-clock budget and the epoch cut short counts as the last. In full: docs/NOTES.md.
Adapted from: GenerativeZoo ``src/generativezoo/models/AR/VQVAE_Transformer.py`` (train_VQVAE, train_Transformer,
train_model, sample), MONAI's 2D VQ-VAE + transformer tutorial.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PeerConfig:
    channels: tuple = (64, 64)
    num_res_channels: tuple = (64, 64)
    num_res_layers: int = 1
    downsample_parameters: tuple = ((2, 4, 1, 1), (2, 4, 1, 1))
    upsample_parameters: tuple = ((2, 4, 1, 1, 0), (2, 4, 1, 1, 0))
    num_embeddings: int = 256
    embedding_dim: int = 32
    attn_layers_dim: int = 128
    attn_layers_depth: int = 6
    attn_layers_heads: int = 8
    batch_size: int = 128
    lr: float = 2e-4
    lr_t: float = 2e-4
    sample_and_save_freq: int = 5
    seed: int = 0


@dataclass
class StageLog:
    seconds: float = 0.0
    steps: int = 0
    epochs: int = 0                 # epochs started (the last one may be cut short by the budget)
    epoch_losses: list = field(default_factory=list)
    vqvae_train_mode_steps: int = 0  # stage 3: batches encoded with the VQ-VAE in train mode (the bug)


def build_vqvae(cfg: PeerConfig, channels: int = 1):
    from monai.networks.nets import VQVAE
    return VQVAE(spatial_dims=2, in_channels=channels, out_channels=channels, num_res_layers=cfg.num_res_layers,
                 downsample_parameters=cfg.downsample_parameters, upsample_parameters=cfg.upsample_parameters,
                 channels=cfg.channels, num_res_channels=cfg.num_res_channels, num_embeddings=cfg.num_embeddings,
                 embedding_dim=cfg.embedding_dim)


def build_transformer(cfg: PeerConfig, latent_hw: tuple[int, int]):
    from monai.networks.nets import DecoderOnlyTransformer
    return DecoderOnlyTransformer(num_tokens=cfg.num_embeddings + 1, max_seq_len=latent_hw[0] * latent_hw[1],
                                  attn_layers_dim=cfg.attn_layers_dim, attn_layers_depth=cfg.attn_layers_depth,
                                  attn_layers_heads=cfg.attn_layers_heads)


@torch.no_grad()
def latent_shape(vqvae, images01: torch.Tensor) -> tuple[int, int]:
    """(h, w) of the token grid, from the encoder alone (the quantiser in train mode would move the codebook)."""
    return tuple(vqvae.encode(images=images01[:1]).shape[2:])


def ordering_for(latent_hw: tuple[int, int]):
    from monai.utils.enums import OrderingType
    from monai.utils.ordering import Ordering
    return Ordering(ordering_type=OrderingType.RASTER_SCAN.value, spatial_dims=2, dimensions=(1,) + tuple(latent_hw))


def _batches(n: int, batch: int, gen: torch.Generator):
    """One shuffled epoch of index batches (DataLoader(shuffle=True), last partial batch kept)."""
    perm = torch.randperm(n, generator=gen)
    for s in range(0, n, batch):
        yield perm[s:s + batch]


def train_vqvae(cfg: PeerConfig, images01: torch.Tensor, budget_s: float, log=print):
    """Stage 1 on ``images01 (N, C, H, W)`` in [0, 1]. Returns (vqvae as the loop leaves it, best state dict, log)."""
    torch.manual_seed(cfg.seed)
    vqvae = build_vqvae(cfg, images01.shape[1])
    opt = torch.optim.Adam(vqvae.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    best, best_state, st = float("inf"), None, StageLog()
    t0 = time.perf_counter()
    out_of_time = False
    while not out_of_time:
        epoch = st.epochs
        st.epochs += 1
        vqvae.train()
        acc, seen = 0.0, 0
        for idx in _batches(len(images01), cfg.batch_size, gen):
            if time.perf_counter() - t0 >= budget_s:
                out_of_time = True
                break
            x = images01[idx]
            opt.zero_grad()
            recon, quant_loss = vqvae(x)
            loss = F.l1_loss(recon.float(), x.float()) + quant_loss
            loss.backward()
            opt.step()
            acc += loss.item() * x.shape[0]
            seen += x.shape[0]
            st.steps += 1
        if seen == 0:
            st.epochs -= 1
            break
        acc /= seen
        st.epoch_losses.append(acc)
        if acc < best:
            best, best_state = acc, copy.deepcopy(vqvae.state_dict())
        if (epoch + 1) % cfg.sample_and_save_freq == 0 or epoch == 0:
            vqvae.eval()  # reconstruct(x[:8]) -> self.vqvae.eval(); no other effect on training
        log(f"peer stage 1 epoch {epoch}: loss {acc:.4f} ({st.steps} steps, {time.perf_counter() - t0:.0f} s)")
    st.seconds = time.perf_counter() - t0
    if best_state is not None:
        vqvae.load_state_dict(best_state)  # train_model: load the best VQ-VAE (the mode stays as it was)
    return vqvae, best_state, st


def train_transformer(cfg: PeerConfig, vqvae, images01: torch.Tensor, budget_s: float, frozen: bool, log=print):
    """Stage 3 through ``VQVAETransformerInferer``. ``vqvae`` is used as stage 1 left it (``frozen``: eval mode).
    Returns (best transformer state dict, transformer, log)."""
    from monai.inferers import VQVAETransformerInferer

    latent_hw = latent_shape(vqvae, images01)
    torch.manual_seed(cfg.seed + 1)
    transformer = build_transformer(cfg, latent_hw)
    ordering, inferer = ordering_for(latent_hw), VQVAETransformerInferer()
    if frozen:
        vqvae.eval()
    opt = torch.optim.Adam(transformer.parameters(), lr=cfg.lr_t)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    batch = max(1, cfg.batch_size // 4)
    best, best_state, st = float("inf"), None, StageLog()
    t0 = time.perf_counter()
    out_of_time = False
    while not out_of_time:
        epoch = st.epochs
        st.epochs += 1
        transformer.train()
        acc, seen = 0.0, 0
        for idx in _batches(len(images01), batch, gen):
            if time.perf_counter() - t0 >= budget_s:
                out_of_time = True
                break
            x = images01[idx]
            st.vqvae_train_mode_steps += int(vqvae.training)
            opt.zero_grad()
            logits, targets, _ = inferer(x, vqvae, transformer, ordering, return_latent=True)
            loss = F.cross_entropy(logits.transpose(1, 2), targets)
            loss.backward()
            opt.step()
            acc += loss.item() * x.shape[0]
            seen += x.shape[0]
            st.steps += 1
        if seen == 0:
            st.epochs -= 1
            break
        acc /= seen
        st.epoch_losses.append(acc)
        if acc < best:
            best, best_state = acc, copy.deepcopy(transformer.state_dict())
        if (epoch + 1) % cfg.sample_and_save_freq == 0 or epoch == 0:
            vqvae.eval()          # sample(16): self.vqvae.eval(); self.transformer.eval()
            transformer.eval()
        log(f"peer stage 3 epoch {epoch}: loss {acc:.4f} ({st.steps} steps, vqvae in train mode for "
            f"{st.vqvae_train_mode_steps} of them)")
    st.seconds = time.perf_counter() - t0
    if best_state is not None:
        transformer.load_state_dict(best_state)
    return best_state, transformer.eval(), st


@torch.no_grad()
def sample(cfg: PeerConfig, vqvae, transformer, n: int, latent_hw: tuple[int, int], batch: int = 500,
           seed: int = 0) -> torch.Tensor:
    """``n`` samples in [0, 1] (unclamped, as MONAI decodes them) through ``inferer.sample`` at temperature 1."""
    from monai.inferers import VQVAETransformerInferer

    vqvae.eval()
    transformer.eval()
    inferer, ordering = VQVAETransformerInferer(), ordering_for(latent_hw)
    torch.manual_seed(seed)  # inferer.sample draws with the global generator
    out = []
    for s in range(0, n, batch):
        b = min(batch, n - s)
        start = torch.full((b, 1), cfg.num_embeddings, dtype=torch.long)
        out.append(inferer.sample(latent_spatial_dim=latent_hw, starting_tokens=start, vqvae_model=vqvae,
                                  transformer_model=transformer, ordering=ordering, verbose=False).float())
    return torch.cat(out)


class MonaiTokenizer(torch.nn.Module):
    """A MONAI VQ-VAE seen through vqgen's tokenizer interface (images in [-1, 1]) for vqgen's evaluation code."""

    def __init__(self, vqvae):
        super().__init__()
        self.vqvae = vqvae.eval()

        class _Cfg:
            num_embeddings = vqvae.num_embeddings
        self.config = _Cfg()

    @torch.no_grad()
    def encode_to_indices(self, x: torch.Tensor) -> torch.Tensor:
        return self.vqvae.index_quantize((x + 1) / 2)

    @torch.no_grad()
    def decode_indices(self, idx: torch.Tensor) -> torch.Tensor:
        return self.vqvae.decode_samples(idx) * 2 - 1
