"""Small model builders and flag sets shared by several test modules (importable: pytest puts tests/ on sys.path)."""

import torch

# A stage-1 run on the digits that trains in seconds. Constant lr: tests cut runs with --max_steps, which is also
# the horizon of the default cosine schedule, and compare them with uninterrupted runs.
TINY_VQVAE_FLAGS = ["--dataset", "digits", "--num_channels", "16", "32", "--num_res_channels", "16", "32",
                    "--num_res_layers", "1", "--num_embeddings", "32", "--embedding_dim", "8", "--batch_size", "128",
                    "--no_wandb", "--val_images", "64", "--lr", "1e-3", "--lr_schedule", "constant"]


def tiny_vqvae(seed=0, k=32):
    """A 2-level, 8-channel VQ-VAE for 16x16 one-channel images (4x4 latent, ``k`` codes), in eval mode."""
    from vqgen.models.vqvae import VQVAE, VQVAEConfig
    torch.manual_seed(seed)
    cfg = VQVAEConfig(in_channels=1, image_size=16, num_channels=(8, 8), num_res_channels=(8, 8), num_res_layers=1,
                      downsample_parameters=((2, 4, 1, 1), (2, 4, 1, 1)),
                      upsample_parameters=((2, 4, 1, 1, 0), (2, 4, 1, 1, 0)), num_embeddings=k, embedding_dim=4)
    return VQVAE(cfg).eval()


def tiny_vqmodel(seed=0, k=32, lookup_from_codebook=False):
    """A randomly initialised diffusers ``VQModel`` for 16x16 one-channel images (2 blocks: 8x8 codes, ``k`` codes)."""
    from diffusers import VQModel
    torch.manual_seed(seed)
    return VQModel(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                   latent_channels=4, vq_embed_dim=4, sample_size=16, num_vq_embeddings=k, norm_num_groups=4,
                   lookup_from_codebook=lookup_from_codebook).eval()


def fill_hub_cache(cache_dir, repo_id, folder, subfolder="", commit="0123456789abcdef0123456789abcdef01234567",
                   ref="main"):
    """Put the files of ``folder`` into a Hugging Face Hub cache as ``hf_hub_download`` lays it out (no network):
    ``models--<user>--<repo>/blobs/<etag>`` (sha256 for large files, which the Hub stores in LFS; the git blob sha1
    for small ones), ``snapshots/<commit>/<subfolder>/<file>`` -> relative symlink to the blob, ``refs/<ref>``."""
    import hashlib
    import os
    from pathlib import Path

    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    snap = repo / "snapshots" / commit / subfolder
    snap.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(folder).iterdir()):
        data = f.read_bytes()
        lfs = f.suffix == ".safetensors"
        etag = hashlib.sha256(data).hexdigest() if lfs else \
            hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo / "blobs" / etag).write_bytes(data)
        link = snap / f.name
        link.symlink_to(os.path.relpath(repo / "blobs" / etag, link.parent))
    (repo / "refs" / ref).write_text(commit)
    return repo / "snapshots" / commit


def shard_samples(path):
    """Raw samples ``{"__key__", "tokens.npy": bytes, "cls": bytes, ...}`` of one token shard, in order, read by
    webdataset itself (an independent reader: the tests check vqgen's shards with it, not with vqgen's reader)."""
    import webdataset as wds
    return [{k: v for k, v in s.items() if k != "__url__"} for s in wds.WebDataset(str(path), shardshuffle=False)]
