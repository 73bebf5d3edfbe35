"""Drawing tokens from a prior of any kind, and decoding them to images.

:func:`generate` handles labels, batching, eval/inference mode and autocast, then calls the prior kind's
``sample_tokens``; the helpers below (logits filters, classifier-free guidance as one batch of cond ‖ null rows,
guidance schedules: constant, linear, power) are shared by every kind. A token is drawn by the exponential race
``argmax(p / E)``, ``E ~ Exp(1)`` (no host sync), so compiled and eager decoding draw the same tokens. Details:
docs/NOTES.md.
Adapted from: gpt-fast / LlamaGen ``generate.py``; the linear CFG ramp from VAR ``models/var.py``; the power ramp
from RAR ``modeling/rar.py`` (``guidance_scale_pow``, after MDT).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..config import CFG_POWER, SamplingConfig, check_kind_sampling, check_sampling_args, draw_settings
from ..errors import ConfigError
from ..generation import check_class_label
from .prior import Prior


# ---- logits filters -------------------------------------------------------------------------------------
def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the ``k`` largest logits per row (ties with the k-th are kept), set the rest to ``-inf``."""
    if k is None or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]              # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability mass is >= ``p``."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs                        # mass of strictly more likely tokens
    remove = mass_before >= p
    remove[..., 0] = False                                            # always keep the most likely token
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def exponential_noise(shape: tuple[int, int], device: torch.device,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """``E ~ Exp(1)`` of shape ``(B, vocab)``, fp32, from ``generator``: one token draw of :func:`sample_logits`."""
    noise = torch.empty(shape, dtype=torch.float32, device=device).exponential_(generator=generator)
    return noise.clamp_min_(torch.finfo(torch.float32).tiny)  # never 0: a filtered token (p = 0) never wins


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, generator: torch.Generator | None = None,
                  noise: torch.Tensor | None = None) -> torch.Tensor:
    """``logits (B, vocab)`` -> tokens ``(B,)``. Greedy (no random draw) when ``temperature == 0``; otherwise
    ``argmax(p / E)`` over the filtered softmax ``p``: each token wins with probability ``p`` (the exponential race,
    no host sync). ``noise``: ``E`` from :func:`exponential_noise`, drawn here from ``generator`` when not given."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)
    probs = F.softmax(logits, dim=-1)
    if noise is None:
        noise = exponential_noise(probs.shape, probs.device, generator)
    return torch.argmax(probs / noise, dim=-1)


def guidance_at(cfg_scale: float, schedule: str, i: int, n: int, power: float = CFG_POWER) -> float:
    """The CFG scale for token (or decoding step) ``i`` of ``n``: ``cfg_scale`` throughout, (linear) 1 ->
    ``cfg_scale``, or (power) ``1 + (cfg_scale - 1) * (1 - cos((i / n) ** power * pi)) / 2`` as RAR computes it
    (1 at i = 0 for a power > 0; power 0: ``cfg_scale`` throughout)."""
    if schedule == "power":
        return 1.0 + (cfg_scale - 1.0) * (1.0 - math.cos((i / n) ** power * math.pi)) / 2
    if schedule == "constant" or n < 2:
        return cfg_scale
    return 1.0 + (cfg_scale - 1.0) * i / (n - 1)


def apply_cfg(logits: torch.Tensor, cfg_scale: float | torch.Tensor) -> torch.Tensor:
    """``logits (2B, vocab)`` ordered (cond ‖ null) -> guided ``(B, vocab)`` (``cfg_scale``: a float or a 0-d
    tensor, which a compiled step takes without recompiling when the scale changes)."""
    cond, uncond = logits.float().chunk(2, dim=0)
    return uncond + cfg_scale * (cond - uncond)


# ---- generation ---------------------------------------------------------------------------------------
def _labels_tensor(prior: Prior, labels, num_samples: int) -> torch.Tensor:
    """None / int / sequence / tensor -> ``(N,)`` long on CPU with -1 mapped to the null class."""
    if labels is None:
        lab = torch.full((num_samples,), -1, dtype=torch.long)
    elif isinstance(labels, int):
        lab = torch.full((num_samples,), labels, dtype=torch.long)
    else:
        lab = torch.as_tensor(labels, dtype=torch.long).reshape(-1).cpu()
    if lab.numel() != num_samples:
        raise ConfigError(f"got {lab.numel()} labels for num_samples={num_samples}")
    return prior.resolve_labels(lab, num_samples, torch.device("cpu"))


def _settings(prior: Prior, conditional: bool, given: dict, kind_options: dict) -> dict:
    """The draw settings of one ``generate`` call: given > the prior's stored setting for this mode > built-in."""
    stored = (prior.generation_config or {}).get("conditional" if conditional else "unconditional")
    kw, _ = draw_settings(**given, stored=stored, conditional=conditional)
    check_sampling_args(**kw, **kind_options)
    return kw


def generate(prior: Prior, num_samples: int, labels: int | Sequence[int] | torch.Tensor | None = None,
             temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
             cfg_scale: float | None = None, generator: torch.Generator | None = None,
             batch_size: int | None = None, autocast_dtype: torch.dtype | None = None,
             cfg_schedule: str | None = None, cfg_power: float | None = None, compile: bool = False,
             decode_steps: int | None = None, choice_temperature: float | None = None, **options) -> torch.Tensor:
    """Sample ``num_samples`` token grids -> LongTensor ``(N, latent_h, latent_w)`` on the CPU.

    labels: None (unconditional / null class), one class id for all, or N ids (-1 = null class).
    temperature, top_k, top_p, cfg_scale, cfg_schedule, cfg_power: None takes the prior's stored setting for this
        mode (``prior.generation_config``), else the built-in default (:func:`vqgen.config.draw_settings`;
        ``top_k=0`` / ``top_p=1``: no filter). Guidance (cond ‖ null rows) is skipped at scale 1 and without labels.
    decode_steps, choice_temperature: a MaskGIT prior's decoding (None: the prior's own); an error for other kinds.
    generator: a ``torch.Generator`` on the prior's device; autocast_dtype: e.g. ``torch.bfloat16`` (caches too).
    compile: the prior's compiled decode step (kinds with ``compiled_decoding``; others decode eagerly), compiled
        once per (batch, dtype); caches and graphs stay until ``prior.release_caches()``. The same tokens as eager.
    options: the prior kind's own (``use_cache=False``: the AR prior's reference path, the same tokens).
    """
    kind_options = dict(decode_steps=decode_steps, choice_temperature=choice_temperature)
    check_kind_sampling(prior.config.prior_kind, kind_options)
    options.update({k: v for k, v in kind_options.items() if v is not None})
    if num_samples < 1:
        raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
    cfg = prior.config
    device = next(prior.parameters()).device
    labels_all = _labels_tensor(prior, labels, num_samples)
    # no guidance where it changes nothing: an unconditional prior, or only null-class rows (cond = null)
    conditional = cfg.num_classes > 0 and bool((labels_all != cfg.null_class).any())
    kw = _settings(prior, conditional, dict(temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale,
                                            cfg_schedule=cfg_schedule, cfg_power=cfg_power), kind_options)
    cfg_scale, cfg_schedule, cfg_power = kw["cfg_scale"], kw["cfg_schedule"], kw["cfg_power"]
    use_cfg = cfg_scale != 1.0 and conditional
    bs = min(batch_size or num_samples, num_samples)
    sample_kw = dict(temperature=kw["temperature"], top_k=kw["top_k"] or None,
                     top_p=kw["top_p"] if kw["top_p"] < 1.0 else None, generator=generator)  # the filters' "off": None
    if autocast_dtype is not None:
        options.setdefault("cache_dtype", autocast_dtype)
    compile = compile and prior.compiled_decoding
    if compile:
        options["compile"] = True
    was_training = prior.training
    prior.eval()
    chunks = []
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                                                    enabled=autocast_dtype is not None):
            for s in range(0, num_samples, bs):
                lab = labels_all[s: s + bs].to(device)
                if use_cfg:
                    lab = torch.cat([lab, torch.full_like(lab, cfg.null_class)])   # (cond ‖ null)
                toks = prior.sample_tokens(lab, use_cfg, cfg_scale, cfg_schedule, sample_kw, cfg_power=cfg_power,
                                           **options)
                chunks.append(toks.cpu())
    finally:
        if not compile:
            prior.release_caches()  # a training-time evaluation must not leave buffers on the device
        prior.train(was_training)
    return torch.cat(chunks).reshape(num_samples, cfg.latent_h, cfg.latent_w)


# ---- images ---------------------------------------------------------------------------------------------
def decode_to_images(tokenizer, tokens: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """``tokens (N, h, w)`` -> images ``(N, C, H, W)`` in [-1, 1] on the CPU, via ``tokenizer.decode_indices``."""
    device = next(tokenizer.parameters()).device
    out = []
    with torch.inference_mode():
        for s in range(0, tokens.shape[0], max(int(batch_size), 1)):
            imgs = tokenizer.decode_indices(tokens[s: s + batch_size].to(device).long())
            out.append(imgs.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def class_labels(prior: Prior, n: int, class_label: int | None, mode: str = "cycle", seed: int = 0,
                 class_counts: Sequence[int] | None = None, unconditional: bool = False) -> torch.Tensor | None:
    """The ``(n,)`` labels to sample; None (the null class) for an unconditional prior or with ``unconditional``:
    ``class_label`` for all, else as ``mode`` says (:data:`vqgen.config.LABEL_MODES`): cycle through the classes, or
    draws from the training split's class frequencies (``class_counts``, default: recorded in the prior's export)
    seeded by ``seed``."""
    k = prior.config.num_classes
    check_class_label(SamplingConfig(class_label=class_label, unconditional=unconditional), k)
    if class_label is not None:
        return torch.full((n,), class_label, dtype=torch.long)
    if not k or unconditional:
        return None
    if mode == "frequencies":
        counts = class_counts if class_counts is not None else (prior.export_meta.shards or {}).get("class_counts")
        if not counts or len(counts) != k or sum(counts) <= 0:
            raise ConfigError("--label_mode frequencies: this prior records no class frequencies of its training "
                              "split (shards extracted before vqgen counted them: re-extract them, or use --label_mode "
                              "cycle / --unconditional)")
        g = torch.Generator().manual_seed(seed)
        return torch.multinomial(torch.tensor(counts, dtype=torch.float64), n, replacement=True, generator=g)
    return torch.arange(n) % k
