"""A diffusers VQModel as vqgen's tokenizer (issue 14): the adapter against the model's own code, a location-free
fingerprint, and the whole chain extract -> train prior -> sample on a small random VQModel from the Hub cache."""

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="the diffusers extra (pip install 'vqgen[diffusers]'; in the test extra)")

from factories import fill_hub_cache, tiny_vqmodel  # noqa: E402
from vqgen import extract, sample  # noqa: E402
from vqgen.cli import run_cli  # noqa: E402
from vqgen.config import ExtractConfig, PriorStageConfig, SampleConfig  # noqa: E402
from vqgen.export import check_compatible  # noqa: E402
from vqgen.models.tokenizer import load_tokenizer  # noqa: E402
from vqgen.train import prior_task  # noqa: E402


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vq") / "vqgan"
    tiny_vqmodel().save_pretrained(d)  # config.json (_class_name VQModel) + diffusion_pytorch_model.safetensors
    return d


def test_adapter_matches_the_vqmodel_and_fingerprint_ignores_location(vq_dir, tmp_path):
    tok, exp = load_tokenizer(vq_dir)
    vq = tok.vq
    assert exp.kind == "diffusers-vqmodel" and tok.config.latent_size == (8, 8) and tok.config.codebook_size == 32
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    idx = tok.encode_to_indices(x)
    with torch.no_grad():
        _, _, (_, _, ref) = vq.quantize(vq.encode(x).latents)
        recon_ref = vq.decode(vq.encode(x).latents).sample        # diffusers' own quantize-then-decode
    assert idx.shape == (3, 8, 8) and torch.equal(idx.reshape(-1), ref.reshape(-1))
    torch.testing.assert_close(tok.decode_indices(idx), recon_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tok.decode_indices(idx.reshape(3, 64)), recon_ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="code indices must be in"):
        tok.decode_indices(torch.full((1, 8, 8), 32))
    shutil.copytree(vq_dir, tmp_path / "elsewhere")
    assert load_tokenizer(tmp_path / "elsewhere")[1].sha256 == exp.sha256          # same content, same fingerprint
    other = tmp_path / "other"
    tiny_vqmodel(seed=1).save_pretrained(other)
    assert load_tokenizer(other)[1].sha256 != exp.sha256
    lookup = tmp_path / "lookup"  # same weights, decode(indices) path of lookup_from_codebook models (aMUSEd)
    tiny_vqmodel(lookup_from_codebook=True).save_pretrained(lookup)
    torch.testing.assert_close(load_tokenizer(lookup)[0].decode_indices(idx), recon_ref, atol=1e-5, rtol=1e-5)


def test_amused_vqgan_gets_unit_range_images(vq_dir, tmp_path):
    """aMUSEd's pipelines feed their VQGAN [0, 1] images: the repo's model_index.json switches the adapter."""
    shutil.copytree(vq_dir, tmp_path / "repo" / "vqvae")
    (tmp_path / "repo" / "model_index.json").write_text(json.dumps({"_class_name": "AmusedPipeline"}))
    tok, exp = load_tokenizer(tmp_path / "repo" / "vqvae")
    plain, plain_exp = load_tokenizer(vq_dir)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert exp.config["vqgen_pixel_range"] == "0,1" and exp.sha256 != plain_exp.sha256
    assert torch.equal(tok.encode_to_indices(x), plain.encode_to_indices((x + 1) / 2))
    idx = tok.encode_to_indices(x)
    torch.testing.assert_close(tok.decode_indices(idx), plain.decode_indices(idx) * 2 - 1)


def test_prior_on_a_published_vqgan_codes_extract_train_sample(vq_dir, tmp_path, monkeypatch):
    """The README recipe on a VQModel stored like aMUSEd's (subfolder vqvae of a Hub repo), read from the cache."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    fill_hub_cache(tmp_path / "hf" / "hub", "someone/vqgan-16", vq_dir, subfolder="vqvae")
    ref = "hf:someone/vqgan-16/vqvae"
    shards_dir, prior_dir, out = tmp_path / "shards", tmp_path / "prior", tmp_path / "samples"
    assert run_cli(extract.run, ExtractConfig,
                   ["--checkpoint", ref, "--dataset", "digits", "--data_dir", str(tmp_path / "data"), "--output",
                    str(shards_dir), "--split", "train", "test", "--shard_size", "1000", "--no_progress"]) == 0
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    sha = load_tokenizer(ref)[1].sha256
    assert manifest["tokenizer"]["sha256"] == sha and manifest["codebook_size"] == 32
    assert manifest["tokenizer"]["path"] == ref  # the ref, not this machine's cache folder
    assert (manifest["latent_h"], manifest["latent_w"]) == (8, 8) and manifest["splits"]["train"]["total"] == 1500
    assert run_cli(prior_task.run, PriorStageConfig,
                   ["--shards", str(shards_dir), "--output_dir", str(prior_dir),  # tokenizer: the manifest's ref
                    "--batch_size", "128", "--n_epochs_t", "1", "--attn_layers_dim", "32", "--attn_layers_depth", "1",
                    "--attn_layers_heads", "2", "--report_to", "none", "--num_samples", "4", "--val_batches", "1",
                    "--warmup_steps", "2", "--tune_sampling", "none"]) == 0
    prior_meta = json.loads((prior_dir / "export" / "config.json").read_text())["meta"]
    assert prior_meta["tokenizer_sha256"] == sha
    assert (prior_dir / "samples" / "samples_epoch0001.png").exists()             # grids decoded by the VQModel
    assert run_cli(sample.run, SampleConfig,
                   ["--checkpoint", ref, "--checkpoint_t", str(prior_dir / "export"), "--num_samples", "5",
                    "--output_dir", str(out)]) == 0
    tokens = np.load(out / "tokens.npy")
    assert tokens.shape == (5, 8, 8) and tokens.max() < 32 and len(list((out / "images").glob("*.png"))) == 5
    # the one compatibility check treats a VQModel like a vqgen tokenizer: another VQGAN is refused
    from vqgen.errors import CheckpointError, ShardError
    from vqgen.models.prior import Prior
    from vqgen.shards import Manifest

    other = tmp_path / "other"
    tiny_vqmodel(seed=1).save_pretrained(other)
    prior = Prior.from_export(prior_dir / "export")
    check_compatible(tokenizer=load_tokenizer(ref)[0], prior=prior, shards=Manifest.read(shards_dir))
    with pytest.raises(CheckpointError, match="trained on codes of tokenizer"):
        check_compatible(tokenizer=load_tokenizer(other)[0], prior=prior)
    with pytest.raises(ShardError, match="re-extract"):
        check_compatible(tokenizer=load_tokenizer(other)[0], shards=Manifest.read(shards_dir))
