"""Prior: config validation, causality, KV-cache logits, CFG, training signal, exports."""


import pytest
import torch

from vqgen.config import PriorConfig, load_config
from vqgen.errors import CheckpointError, ConfigError
from vqgen.export import ExportMeta, save_export
from vqgen.models.prior import Prior, build_prior


def tiny(num_classes=0, **kw) -> Prior:
    torch.manual_seed(0)
    cfg = PriorConfig(vocab_size=16, latent_h=3, latent_w=4, attn_layers_dim=32, attn_layers_depth=2,
                      attn_layers_heads=4, num_classes=num_classes, **kw)
    return build_prior(cfg).eval()


def test_config_validate_and_flags():
    with pytest.raises(ConfigError, match="divisible"):
        PriorConfig(vocab_size=16, latent_h=2, latent_w=2, attn_layers_dim=30, attn_layers_heads=8).validate()
    with pytest.raises(ConfigError):
        PriorConfig(vocab_size=16, latent_h=2, latent_w=2, class_dropout=1.0).validate()
    with pytest.raises(ConfigError, match="unknown"):
        PriorConfig.from_dict({"vocab_size": 4, "latent_h": 2, "latent_w": 2, "bogus": 1})
    flags = load_config(PriorConfig, [])
    assert (flags.attn_layers_dim, flags.attn_layers_depth, flags.attn_layers_heads) == (96, 12, 8)
    assert (flags.attn_dropout, flags.class_dropout) == (0.0, 0.1)
    cfg = flags.build(vocab_size=256, latent_h=8, latent_w=8, num_classes=10)
    assert cfg.seq_len == 64 and cfg.null_class == 10 and cfg.attn_layers_dim == 96
    bad = load_config(PriorConfig, ["--attn_layers_heads", "7"])
    with pytest.raises(ConfigError):
        bad.build(256, 8, 8, 0)


def test_forward_shape_and_causal():
    p = tiny(num_classes=3)
    toks = torch.randint(0, 16, (2, 12))
    lab = torch.tensor([0, 2])
    with torch.no_grad():
        out = p(toks, lab).logits
        assert out.shape == (2, 12, 16)
        changed = toks.clone()
        changed[:, 7] = (changed[:, 7] + 1) % 16
        out2 = p(changed, lab).logits
    # logits at position i depend on tokens < i only: positions 0..7 unchanged, 8.. changed
    torch.testing.assert_close(out[:, :8], out2[:, :8], atol=1e-6, rtol=0)
    assert (out[:, 8:] - out2[:, 8:]).abs().max() > 1e-4
    # grid input is read in raster order
    torch.testing.assert_close(p(toks.view(2, 3, 4), lab).logits, out)


def test_labels_checked():
    p = tiny(num_classes=3)
    with pytest.raises(ConfigError):
        p(torch.zeros(2, 12, dtype=torch.long), torch.tensor([0, 4]))
    u = tiny()
    with pytest.raises(ConfigError):
        u(torch.zeros(1, 12, dtype=torch.long), torch.tensor([1]))
    with torch.no_grad():  # -1 (no label) and None both mean the null class
        torch.testing.assert_close(u(torch.zeros(1, 12, dtype=torch.long), torch.tensor([-1])),
                                   u(torch.zeros(1, 12, dtype=torch.long), None))


@pytest.mark.parametrize("num_classes", [0, 3])
def test_cached_decode_matches_full_forward(num_classes):
    p = tiny(num_classes=num_classes)
    torch.manual_seed(1)
    toks = torch.randint(0, 16, (3, 12))
    lab = torch.tensor([0, 1, -1]) if num_classes else None
    with torch.no_grad():
        full = p(toks, lab).logits                                         # (3, 12, 16)
        labels = p.resolve_labels(lab, 3, toks.device)
        p.setup_caches(4, 12, torch.float32)
        for n_prefix in (0, 5):
            steps = [p.prefill(toks[:, :n_prefix], labels)]
            for i in range(n_prefix, 11):
                steps.append(p.decode_one_token(toks[:, i], i + 1))
            torch.testing.assert_close(torch.stack(steps, 1), full[:, n_prefix:], atol=1e-5, rtol=0)
        # prefix recompute path agrees too
        torch.testing.assert_close(p.logits_for_prefix(toks[:, :6], labels), full[:, 6], atol=1e-5, rtol=0)


def test_class_dropout_is_deterministic_and_only_in_training():
    p = tiny(num_classes=3, class_dropout=0.5)
    toks = torch.randint(0, 16, (64, 12))
    lab = torch.randint(0, 3, (64,))
    p.train()
    torch.manual_seed(5)
    a = p(toks, lab).logits
    torch.manual_seed(5)
    b = p(toks, lab).logits
    torch.testing.assert_close(a, b)
    p.eval()
    with torch.no_grad():
        cond = p(toks, lab).logits
        null = p(toks, None).logits
    # in training, some rows got the null class, some kept theirs
    rows_null = (a[:, 0] - null[:, 0]).abs().amax(-1) < 1e-5
    rows_cond = (a[:, 0] - cond[:, 0]).abs().amax(-1) < 1e-5
    assert rows_null.any() and rows_cond.any() and bool((rows_null | rows_cond).all())


def test_loss_decreases_on_synthetic_tokens():
    torch.manual_seed(0)
    cfg = PriorConfig(vocab_size=8, latent_h=4, latent_w=4, attn_layers_dim=32, attn_layers_depth=2,
                      attn_layers_heads=4, num_classes=2,
                      class_dropout=0.1)
    p = build_prior(cfg).train()
    # class c: a shifted diagonal pattern (tokens = (row + col + 3c) mod 8) with a random start offset
    lab = torch.randint(0, 2, (64,))
    off = torch.randint(0, 8, (64, 1, 1))
    grid = torch.arange(4).view(4, 1) + torch.arange(4).view(1, 4)
    data = ((grid + 3 * lab.view(-1, 1, 1) + off) % 8).reshape(64, 16)
    opt = torch.optim.AdamW(p.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        idx = torch.randint(0, 64, (32,))
        loss = p.loss(data[idx], lab[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(8.0)).item(), abs=0.3)  # ~uniform at init
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0]


def test_export_round_trip(tmp_path):
    p = tiny(num_classes=3)
    sha = p.export_to(tmp_path / "export", meta=ExportMeta(tokenizer_sha256="abc"))
    q = Prior.from_export(tmp_path / "export")
    assert not q.training and q.config == p.config and q.export_meta.tokenizer_sha256 == "abc"
    toks = torch.randint(0, 16, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(q(toks, torch.tensor([1, 2])).logits, p(toks, torch.tensor([1, 2])).logits, atol=0, rtol=0)
    assert len(sha) == 64
    # a run dir holding export/ works too
    assert Prior.from_export(tmp_path).config == p.config


def test_from_export_refuses_other_kinds_and_mismatches(tmp_path):
    save_export(tmp_path / "vq", "vqvae", {"num_embeddings": 16}, {"w": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="vqvae"):
        Prior.from_export(tmp_path / "vq")
    p = tiny()
    sd = p.state_dict()
    sd.pop("head.weight")
    cfg = dict(vars(p.config))
    save_export(tmp_path / "bad", "prior", cfg, sd)
    with pytest.raises(CheckpointError, match="do not fit"):
        Prior.from_export(tmp_path / "bad")
    with pytest.raises(CheckpointError):
        Prior.from_export(tmp_path / "missing")
