"""The feature spaces of FID / IS / precision-recall: one forward pass per image gives (features, logits).

``--features``:
  inception   Inception-v3 pool features / logits (the standard FID) when weights are on disk (``--inception_weights``
              or the torch hub cache; nothing is downloaded): torch-fidelity's TF-ported graph for a file in its
              layout, else torchvision's graph (close to, not identical with, TF-FID).
  classifier  a small CNN trained on the dataset itself (:mod:`vqgen.eval.classifier`, cached): the offline default;
              values compare only under the same classifier export, never with published Inception FIDs.
  auto        inception when weights are found, else classifier.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError
from ..export import is_export

INCEPTION_FILES = ("weights-inception-2015-12-05-6726825d.pth",   # torch-fidelity / torchmetrics (TF-FID port)
                   "pt_inception-2015-12-05-6726825d.pth",        # pytorch-fid (same weights)
                   "inception_v3_google-0cc3c7bd.pth")            # torchvision ImageNet weights


def find_inception_weights(path: str | None) -> Path | None:
    """``--inception_weights`` (must exist: ConfigError otherwise) or a known file in the torch hub cache."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"--inception_weights {p} does not exist. vqgen never downloads weights; copy the "
                              f"file there (one of {', '.join(INCEPTION_FILES)}), or use --features classifier "
                              f"(offline feature space)")
        return p
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    for name in INCEPTION_FILES:
        if (hub / name).is_file():
            return hub / name
    return None


class InceptionFeatures(torch.nn.Module):
    """Images in [-1, 1] (any size, 1 or 3 channels) -> (pool features (B, 2048), logits (B, 1000|1008))."""

    def __init__(self, weights: Path):
        super().__init__()
        self.weights = Path(weights)
        self.fidelity = None
        try:  # torch-fidelity (a dependency) runs the TF-FID graph when the file is in its layout
            from torchmetrics.image.fid import NoTrainInceptionV3
            self.fidelity = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=str(weights))
            self.graph = "torch-fidelity inception-v3-compat (TF-FID)"
        except (ModuleNotFoundError, RuntimeError):  # no torch-fidelity, or a torchvision-layout file
            self.fidelity = None
            self._load_torchvision(weights)
            self.graph = "torchvision inception_v3"
        self.eval()

    def _load_torchvision(self, weights: Path) -> None:
        from torchvision.models import inception_v3
        try:
            sd = torch.load(str(weights), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's problem to fix
            raise CheckpointError(f"cannot read Inception weights {weights}: {str(e).splitlines()[0]}") from None
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else {}
        if "fc.weight" not in sd:
            raise CheckpointError(f"{weights} does not hold Inception-v3 weights (no fc.weight)")
        net = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=sd["fc.weight"].shape[0],
                           transform_input=False)
        own = net.state_dict()
        usable = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
        if len(usable) < 0.95 * len(own):
            raise CheckpointError(f"{weights}: only {len(usable)} of {len(own)} Inception-v3 tensors match "
                                  f"torchvision's graph (install torch-fidelity for the TF-FID file layout)")
        net.load_state_dict(usable, strict=False)
        net.fc_ = net.fc
        net.fc = torch.nn.Identity()
        self.net = net

    @torch.no_grad()
    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.fidelity is not None:
            feats, logits = self.fidelity(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
            return feats.reshape(x.shape[0], -1), logits.reshape(x.shape[0], -1)
        # Google's Inception takes [-1, 1] at 299x299 (torchvision's transform_input maps ImageNet-normalised
        # inputs to exactly that range, so it is off here)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=True)
        feats = self.net(x)
        return feats, self.net.fc_(feats)


class FeatureSpace:
    """One forward pass per image -> (features, logits); ``info`` is what eval.json records about the space."""

    def __init__(self, name: str, net: torch.nn.Module, device: torch.device, info: dict,
                 classifier: torch.nn.Module | None = None):
        self.name, self.net, self.device, self.info, self.classifier = name, net.to(device).eval(), device, info, classifier

    @torch.no_grad()
    def batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch -> (features (B, D), logits (B, C)) on the CPU, float64 (evaluate.py streams batches)."""
        f, lg = self.net.features_and_logits(images.to(self.device))
        return f.double().cpu(), lg.double().cpu()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        feats, logits = [], []
        for s in range(0, images.shape[0], batch_size):
            f, lg = self.net.features_and_logits(images[s:s + batch_size].to(self.device))
            feats.append(f.double().cpu())
            logits.append(lg.double().cpu())
        return torch.cat(feats), torch.cat(logits)


def build_feature_space(cfg, dataset: str, image_size: int, channels: int, device: torch.device,
                        log=print) -> FeatureSpace:
    """The feature space ``cfg`` (an :class:`~vqgen.config.EvalConfig`) asks for."""
    from . import classifier as C

    weights = find_inception_weights(cfg.inception_weights)   # raises at once for a bad explicit path
    mode = "inception" if cfg.inception_weights else cfg.features
    if mode == "inception" and weights is None:
        raise ConfigError(f"--features inception: no Inception-v3 weights on disk (looked for "
                          f"{', '.join(INCEPTION_FILES)} in {Path(torch.hub.get_dir()) / 'checkpoints'}); vqgen never "
                          f"downloads them. Pass --inception_weights PATH or use --features classifier")
    if mode == "auto":
        mode = "inception" if weights is not None else "classifier"
    root = cfg.classifier_dir or cfg.data.data_dir
    if mode == "inception":
        net = InceptionFeatures(weights)
        clf = None
        if is_export(C.cache_dir(root, dataset)):  # classifier stats when one is already cached
            clf = C.Classifier.from_export(C.cache_dir(root, dataset)).to(device)
        return FeatureSpace("inception", net, device, {"name": "inception", "weights": str(weights),
                                                       "graph": net.graph}, clf)
    clf = C.load_or_train(dataset, cfg.data.data_dir, image_size, channels, root=root, retrain=cfg.retrain_classifier,
                          epochs=cfg.classifier_epochs, seed=cfg.sampling.seed, log=log)
    info = {"name": "classifier", "export": str(C.cache_dir(root, dataset)), "sha256": clf.sha256,
            "feature_dim": clf.config.feature_dim, "test_accuracy": clf.export_meta.metrics.get("test_accuracy")}
    return FeatureSpace("classifier", clf, device, info, clf)
