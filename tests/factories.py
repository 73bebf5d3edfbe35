"""Small model builders shared by several test modules (importable: pytest puts tests/ on sys.path)."""

import torch


def tiny_vqvae(seed=0, k=32):
    """A 2-level, 8-channel VQ-VAE for 16x16 one-channel images (4x4 latent, ``k`` codes), in eval mode."""
    from vqgen.models.vqvae import VQVAE, VQVAEConfig
    torch.manual_seed(seed)
    cfg = VQVAEConfig(in_channels=1, image_size=16, num_channels=(8, 8), num_res_channels=(8, 8), num_res_layers=1,
                      downsample_parameters=((2, 4, 1, 1), (2, 4, 1, 1)),
                      upsample_parameters=((2, 4, 1, 1, 0), (2, 4, 1, 1, 0)), num_embeddings=k, embedding_dim=4)
    return VQVAE(cfg).eval()
