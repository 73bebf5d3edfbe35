"""VQVAE: shapes for several geometries, config validation/flags, JSON round-trip, exports."""

import json
import shlex
from dataclasses import asdict, replace

import pytest
import torch

from vqgen.config import load_config
from vqgen.errors import CheckpointError, ConfigError
from vqgen.export import ExportMeta, load_export, save_export
from vqgen.models.vqvae import VQVAE, VQVAEConfig


def tiny(**kw):
    base = dict(in_channels=1, image_size=16, num_channels=(8, 8), num_res_channels=(4, 4), num_res_layers=1,
                num_embeddings=16, embedding_dim=4)
    base.update(kw)
    return VQVAEConfig(**base)


def parse(argv: str) -> VQVAEConfig:
    return load_config(VQVAEConfig, shlex.split(argv))


@pytest.mark.parametrize("kw, latent", [
    (dict(num_channels=(8,), num_res_channels=(4,)), 8),                                       # 1 level
    (dict(), 4),                                                                                # 2 levels, seed params
    (dict(num_channels=(4, 8, 8), num_res_channels=(4, 4, 8)), 2),                              # 3 levels
    (dict(downsample_parameters=(4, 4, 1, 0), upsample_parameters=(4, 4, 1, 0, 0),
          num_channels=(8,), num_res_channels=(4,)), 4),                                        # stride 4, pad 0
    (dict(downsample_parameters=((2, 3, 1, 1), (1, 3, 1, 1)),
          upsample_parameters=((1, 3, 1, 1, 0), (2, 3, 1, 1, 1))), 8),                          # k3, output_padding
    (dict(in_channels=3, num_res_layers=0), 4),                                                 # RGB, no res units
    (dict(in_channels=3, activation="silu", image_size=32), 8),
])
def test_shapes(kw, latent):
    cfg = tiny(**kw)
    cfg.validate()
    assert cfg.latent_size == (latent, latent)
    m = VQVAE(cfg).train()
    x = torch.rand(2, cfg.in_channels, cfg.image_size, cfg.image_size) * 2 - 1
    out = m(x)
    assert out.recon.shape == x.shape
    assert out.indices.shape == (2, latent, latent) and out.indices.dtype == torch.long
    assert out.vq_loss.dim() == 0 and out.perplexity.dim() == 0
    (torch.nn.functional.mse_loss(out.recon, x) + out.vq_loss).backward()
    m.eval()
    idx = m.encode_to_indices(x)
    assert idx.shape == (2, latent, latent) and torch.equal(idx, m.encode_to_indices(x))
    assert m.decode_indices(idx).shape == x.shape


def test_seed_defaults_from_flags():
    cfg = parse("").build(1, 32)
    # the flags are the model config: one set of defaults (the l2 codebook of 8-dim codes among them)
    assert cfg == replace(VQVAEConfig(), in_channels=1, image_size=32)
    assert cfg.codebook_l2 and cfg.embedding_dim == 8 and cfg.quantizer == "vq"
    assert cfg.latent_size == (8, 8)
    # an export written before the l2 codebook existed (no key) meant the plain codebook, under its old key names
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("codebook_l2", "quantizer", "ema_decay")}
    loaded = VQVAEConfig.from_dict({**old, "decay": 0.9, "embedding_dim": 32})
    assert not loaded.codebook_l2 and loaded.ema_decay == 0.9 and loaded.embedding_dim == 32


def test_level_params_broadcast_vs_per_level():
    one = parse('--num_channels 8 8 8 --num_res_channels 4 4 4 '
                                       '--downsample_parameters "2 4 1 1" --upsample_parameters 2 4 1 1 0').build(1, 32)
    per = parse('--num_channels 8 8 8 --num_res_channels 4 4 4 '
                                       '--downsample_parameters "2 4 1 1" "2 4 1 1" 2,4,1,1 '
                                       '--upsample_parameters 2 4 1 1 0 2 4 1 1 0 2 4 1 1 0').build(1, 32)
    assert one == per
    assert one.down_levels == ((2, 4, 1, 1),) * 3 and one.latent_size == (4, 4)
    mixed = parse('--downsample_parameters 2 4 1 1 4 4 1 0 '
                                         '--upsample_parameters 4 4 1 0 0 2 4 1 1 0').build(1, 32)
    assert mixed.down_levels == ((2, 4, 1, 1), (4, 4, 1, 0)) and mixed.latent_size == (4, 4)
    # one level's numbers broadcast to any depth
    assert tiny(num_channels=(8,), num_res_channels=(4,)).down_levels == ((2, 4, 1, 1),)
    assert tiny(upsample_parameters=(2, 4, 1, 1, 0)).up_levels == ((2, 4, 1, 1, 0),) * 2


def test_config_errors():
    with pytest.raises(ConfigError, match=r"has 6 numbers; expected 4 \(one level, repeated\) or 4\*2=8"):
        parse("--downsample_parameters 2 4 1 1 2 4").build(1, 32)
    with pytest.raises(ConfigError, match="upsample_parameters has 4 numbers"):
        parse("--upsample_parameters 2 4 1 1").build(1, 32)
    with pytest.raises(ConfigError, match="num_res_channels has 2 values but --num_channels has 3"):
        parse("--num_channels 8 8 8").build(1, 32)
    with pytest.raises(ConfigError, match="num_res_channels has 1 values but --num_channels has 2"):
        tiny(num_res_channels=(4,)).validate()
    with pytest.raises(ConfigError, match="shrink 8x8 images to nothing"):
        tiny(image_size=8, num_channels=(4,) * 4, num_res_channels=(4,) * 4).validate()
    with pytest.raises(ConfigError, match=r"decoder 3 -> 6 -> 12 -> 24 \(expected 28\)"):
        tiny(image_size=28, num_channels=(4,) * 3, num_res_channels=(4,) * 3).validate()
    with pytest.raises(ConfigError, match=r"downsample_parameters has 8 numbers; expected 4 \(one level, repeated\) or 4\*3=12"):
        tiny(num_channels=(4,) * 3, num_res_channels=(4,) * 3,
             downsample_parameters=((2, 4, 1, 1), (1, 3, 1, 1))).validate()
    with pytest.raises(ConfigError, match="output_padding"):
        tiny(upsample_parameters=(2, 4, 1, 1, 2)).validate()
    with pytest.raises(ConfigError):
        VQVAE(tiny(embedding_dim=0))


def test_config_json_round_trip():
    cfg = tiny(num_channels=(4, 8, 8), num_res_channels=(4, 4, 8),
               downsample_parameters=((2, 4, 1, 1), (2, 4, 1, 1), (1, 3, 1, 1)),
               upsample_parameters=((1, 3, 1, 1, 0), (2, 4, 1, 1, 0), (2, 4, 1, 1, 0)))
    assert cfg.latent_size == (4, 4)
    back = VQVAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.down_levels == cfg.down_levels
    with pytest.raises(ConfigError, match="unknown VQ-VAE config field"):
        VQVAEConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_encode_to_indices_never_touches_the_codebook():
    m = VQVAE(tiny()).train()
    x = torch.rand(2, 1, 16, 16)
    m(x)  # initialise the codebook
    before = {k: v.clone() for k, v in m.quantizer.named_buffers()}
    m.encode_to_indices(x)
    assert all(torch.equal(v, before[k]) for k, v in m.quantizer.named_buffers())


def test_export_round_trip(tmp_path):
    torch.manual_seed(0)
    m = VQVAE(tiny(in_channels=3)).train()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    for _ in range(2):
        m(x)
    m.eval()
    sha = m.export_to(tmp_path / "export", meta=ExportMeta(extra={"note": "test"}))
    loaded = VQVAE.from_export(tmp_path / "export")
    assert not loaded.training and loaded.config == m.config
    assert load_export(tmp_path / "export").sha256 == sha
    idx = m.encode_to_indices(x)
    assert torch.equal(loaded.encode_to_indices(x), idx)
    assert torch.equal(loaded.decode_indices(idx), m.decode_indices(idx))
    assert torch.equal(loaded(x).recon, m(x).recon)
    # A loaded Export object works too; the model stays in eval mode and its codebook is initialised.
    again = VQVAE.from_export(load_export(tmp_path / "export"))
    assert bool(again.quantizer.initialized)


def test_from_export_with_different_config_raises(tmp_path):
    a, b = VQVAE(tiny()), VQVAE(tiny(num_embeddings=32, num_channels=(8, 16), num_res_channels=(4, 4)))
    save_export(tmp_path / "bad", "vqvae", asdict(a.config), b.state_dict())
    with pytest.raises(CheckpointError, match="do not match the VQ-VAE config") as e:
        VQVAE.from_export(tmp_path / "bad")
    assert len(str(e.value)) < 800 and "quantizer.embedding" in str(e.value)
    save_export(tmp_path / "prior", "prior", {"dim": 8}, {"w": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="'prior' export"):
        VQVAE.from_export(tmp_path / "prior")
    save_export(tmp_path / "badcfg", "vqvae", {**asdict(a.config), "image_size": 30}, a.state_dict())
    with pytest.raises(CheckpointError, match="not a valid VQ-VAE config"):
        VQVAE.from_export(tmp_path / "badcfg")


def test_decode_indices_rejects_out_of_range():
    m = VQVAE(tiny()).eval()
    with pytest.raises(ValueError, match=r"must be in \[0, 16\)"):
        m.decode_indices(torch.full((1, 4, 4), 16))
    assert m.decode_indices(torch.zeros(1, 16, dtype=torch.long)).shape == (1, 1, 16, 16)  # flat (B, h*w) ok
