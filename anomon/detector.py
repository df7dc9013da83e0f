"""The anomaly detector: scikit-learn's outlier-detector contract around the autoencoder.

Sign convention, stated once: **anomon scores grow with abnormality.** `score_samples` returns that
score (unlike scikit-learn, whose detectors return "normality"); `decision_function` is
`score - threshold_`, positive means anomalous; `predict` returns 1 for anomalous, 0 for normal.

The score reads the autoencoder in several *views*, each z-scored against held-out normal images
(so no unit wins) and then added with fixed weights. Pixel views of the reconstruction error,
standardised per pixel by the error statistics of normal training images:
  - "mean":  its average, which sees diffuse or global changes (a wrong part, a shifted shape);
  - "local": the maximum of its box-filtered version, which sees a small scratch or chip on a large
             image that the average would dilute away.
Small images (at most 64 px, a dense code, one aligned object per image) add
  - "latent": the Mahalanobis distance of the image's code from the codes of the training images:
             an image the decoder can redraw passably may still need a code no normal image needs;
and score "mean" and "local" at half weight each plus "latent" (Fashion-MNIST classes 0, 2, 4, 6:
mean AUROC "mean+local" 0.869, "latent" 0.896, this combination 0.895, and it keeps the pixel views
that see local defects).

Large images (real inspection photos: a spatial code, 8 numbers per 16x16 cell) add two views, and
score them at half weight each plus "local" at a quarter:
  - "gradient": the maximum of the 5x5-box-filtered difference between the Sobel gradient magnitude
             of the reconstruction and of the image. Squared pixel error is dominated by brightness
             and by textures the network blurs; a crack, a scratch, a pit or a speck is an edge the
             reconstruction does not have.
  - "code":  the distance from the image's code, averaged to a 4x4 grid, to the nearest training
             image's code: what the whole part looks like (its outline, burrs, a dark blotch), which
             a per-pixel view of an unregistered part cannot say.
Measured with the defaults on the real-photo sets (bench/experiments/detector_views.py, 70% of the
normal images to train, test = 20% of them + defects; AUROC kolektor / casting / BSData / PIPED
BDP01): mean 0.51 / 0.60 / 0.96 / 0.89, local 0.75 / 0.58 / 0.92 / 0.99, gradient 0.85 / 0.85 /
0.86 / 0.99, code 0.51 / 0.96 / 0.91 / 0.65; gradient+code 0.84 / 0.95 / 0.93 / 1.00, all four
0.79 / 0.84 / 0.95 / 1.00. Weighing the views by how far synthetic defects (anomon.synth) move
them chose "local" on casting (0.73) and was dropped: synthetic blobs are not what a casting's
defects look like. Full bench (bench/results/real_photos.md), gradient+code: 0.820 / 0.947 /
0.952 / PIPED all 12 types 0.938, and it missed a soft spot of the sample images (29/30, AUROC
0.960); with local at a quarter: 0.833 / 0.923 / 0.951 / 0.979, and the sample images 30/30
(AUROC 1.000). Every view stays in the bundle and can be scored alone (`score=`).
The heat map is the local views' maps, weighted as in the score.

One bundle file (safetensors: tensors + a JSON metadata string, no pickle) holds the weights, the
architecture, preprocessing, error statistics, calibration scores, threshold and training
metadata, so training and serving can never disagree. Its `model_id` is a hash of all of it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from anomon import __version__, bundle
from anomon.atomic import atomic_write
from anomon.calibrate import ConformalThreshold, exceeds
from anomon.config import TrainConfig
from anomon.calibrate import p_values as conformal_p_values
from anomon.errors import BundleError
from anomon.images import shape_of, to_array
from anomon.model import ConvAutoencoder
from anomon.train import TrainResult, fit_autoencoder, pick_device, seed_everything

log = logging.getLogger("anomon.detector")

ScoreKind = Literal["mean", "local", "latent", "gradient", "code", "mean+local", "all"]
SCORE_KINDS: tuple[str, ...] = ("mean", "local", "latent", "gradient", "code", "mean+local", "all")
# Which views each single-purpose score kind reads; "all" reads every view the model has.
SCORE_VIEWS: dict[str, set[str]] = {
    "mean": {"mean"}, "local": {"local"}, "latent": {"latent"}, "gradient": {"gradient"}, "code": {"code"},
    "mean+local": {"mean", "local"},
}
GRADIENT_POOL = 5  # px at the working size: a scratch a few pixels wide stays a peak
CODE_GRID = 4  # the spatial code is averaged to CODE_GRID x CODE_GRID cells for the code view
_DEFAULTS = TrainConfig()  # the one source of training defaults (the CLI's help shows them)
MAX_CODE_BANK = 4096  # training images kept for the code view's nearest-neighbour search
# The score of large images: the gradient view (local defects: cracks, scratches, pits, specks)
# and the code view (whole-part changes: shape, burrs, a wrong part), equally, and the local view
# (soft blobs) at half their weight. Chosen on bench/real_photos.py and the sample images (see the
# module docstring); every view stays in the bundle and can be scored alone (`score=`).
PHOTO_WEIGHTS = {"local": 0.25, "gradient": 0.5, "code": 0.5}


class NotFittedError(RuntimeError):
    pass


def default_pool(image_size: int) -> int:
    """Box size for the local view: about 1/8 of the image, odd, at least 3."""
    k = max(3, image_size // 8)
    return k if k % 2 else k + 1


def box_filter(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mean over a k x k window (odd k, edges averaged over the pixels inside), as two 1-D passes
    of running sums.

    Equal to one k x k `avg_pool2d` with count_include_pad=False (the window's pixel count is rows
    x columns, so it separates), but a running sum costs the same whatever k: for a 256 px image
    (k = 33) the square window took 28 ms per image on 2 CPU cores, two 1-D `avg_pool2d` passes
    5.7 ms, and this 1 ms (2026-11-30, quiet machine). The sums run in float64 so that a hot
    region early in a row does not leave rounding error in the windows after it.
    """
    return _box_1d(_box_1d(x, k, -2), k, -1)


def _box_1d(x: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    n, r = x.shape[dim], k // 2
    c = F.pad(torch.cumsum(x.double(), dim=dim).movedim(dim, -1), (1, 0)).movedim(-1, dim)  # c[i] = sum x[:i]
    idx = torch.arange(n, device=x.device)
    hi, lo = (idx + r + 1).clamp(max=n), (idx - r).clamp(min=0)
    shape = [1] * x.dim()
    shape[dim] = n
    count = (hi - lo).to(torch.float64).view(shape)
    return ((c.index_select(dim, hi) - c.index_select(dim, lo)) / count).to(x.dtype)


def gradient_magnitude(x: torch.Tensor) -> torch.Tensor:
    """(N, H, W) Sobel gradient magnitude of the channel mean of x (N, C, H, W), edges replicated.

    The Sobel kernels separate into [1, 2, 1] / 4 smoothing along one axis and a central difference
    along the other; as shifted slices that is 1.2 ms per 256 px image on 2 CPU cores, against
    1.75 ms for a 2-channel 3x3 convolution (same values to 2e-7)."""
    p = F.pad(x.mean(1, keepdim=True), (1, 1, 1, 1), mode="replicate")[:, 0]
    rows = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]  # smoothed down the columns: (N, H, W + 2)
    cols = p[:, :, :-2] + 2 * p[:, :, 1:-1] + p[:, :, 2:]  # smoothed along the rows: (N, H + 2, W)
    gx = (rows[:, :, 2:] - rows[:, :, :-2]) / 4
    gy = (cols[:, 2:] - cols[:, :-2]) / 4
    return (gx * gx + gy * gy).add(1e-12).sqrt()


def pooled_code(codes: torch.Tensor) -> torch.Tensor:
    """(N, C * CODE_GRID**2): a spatial code averaged to a coarse grid, one vector per image."""
    return F.adaptive_avg_pool2d(codes, CODE_GRID).flatten(1)


def nearest_distance(q: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Euclidean distance from each row of q to its nearest row of bank."""
    d = (q * q).sum(1, keepdim=True) - 2 * q @ bank.T + (bank * bank).sum(1)[None]
    return d.amin(1).clamp(min=0).sqrt()


@dataclass(frozen=True)
class Assessment:
    """One batch's outcome: scores (N,), anomaly maps (N, H, W) at the working size, conformal
    p-values (N,), and verdicts (N,) as booleans (True = anomalous)."""

    scores: np.ndarray
    maps: np.ndarray
    p_values: np.ndarray
    anomalous: np.ndarray


class Detector:
    """Convolutional-autoencoder anomaly detector with a conformal threshold."""

    def __init__(
        self,
        image_size: int | tuple[int, int] = 28,
        channels: int = 1,
        latent_dim: int = _DEFAULTS.latent_dim,
        width: int = 32,
        epochs: int = _DEFAULTS.epochs,
        max_steps: int | None = _DEFAULTS.max_steps,
        batch_size: int = _DEFAULTS.batch_size,
        learning_rate: float = _DEFAULTS.learning_rate,
        patience: int = _DEFAULTS.patience,
        holdout: float = _DEFAULTS.holdout,
        target_fpr: float = _DEFAULTS.target_fpr,
        score: ScoreKind = "all",
        pool: int | None = None,
        seed: int = _DEFAULTS.seed,
        device: str = _DEFAULTS.device,
        time_budget_s: float | None = _DEFAULTS.time_budget_s,
        denoise: float = 0.0,
    ) -> None:
        self.image_size = image_size
        self.channels = channels
        self.latent_dim = latent_dim
        self.width = width
        self.epochs = epochs
        self.max_steps = max_steps
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.patience = patience
        self.holdout = holdout
        self.target_fpr = target_fpr
        self.score = score
        self.pool = pool
        self.seed = seed
        self.device = device
        self.time_budget_s = time_budget_s
        self.denoise = denoise
        self.metadata: dict[str, Any] = {}

    @property
    def input_shape(self) -> tuple[int, int]:
        """(height, width) of the model's input."""
        return shape_of(self.image_size)

    @property
    def size_label(self) -> str:
        """The working size as people write it: "32" for a square, "400x160" (width x height)."""
        h, w = self.input_shape
        return str(h) if h == w else f"{w}x{h}"

    # ------------------------------------------------------------------ fitting
    def fit(self, X: np.ndarray, progress: bool | None = None) -> Detector:
        """Train on normal images X (N, C, H, W) in [0, 1]; hold out a share to calibrate."""
        if self.score not in SCORE_KINDS:
            raise ValueError(f"score must be one of {SCORE_KINDS}, got {self.score!r}")
        X = np.ascontiguousarray(X, dtype=np.float32)
        h, w = self.input_shape
        if X.ndim != 4 or X.shape[1:] != (self.channels, h, w):
            raise ValueError(f"expected images of shape (N, {self.channels}, {h}, {w}), got {X.shape}")
        if h != w and min(h, w) <= 64:
            # Up to 64 px the model has one dense code for a square image (see model.py).
            raise ValueError(f"a working size that is not square needs both sides above 64 px, got {w}x{h}")
        n_hold = holdout_size(len(X), self.holdout)
        if len(X) - n_hold < 2:
            raise ValueError(f"need at least {n_hold + 2} training images, got {len(X)}")
        seed_everything(self.seed)
        self.device_ = pick_device(self.device)
        order = np.random.default_rng(self.seed).permutation(len(X))
        X_hold, X_train = X[order[:n_hold]], X[order[n_hold:]]

        self.model_ = ConvAutoencoder(min(h, w), self.channels, self.latent_dim, self.width)
        result = fit_autoencoder(
            self.model_,
            X_train,
            X_hold,
            epochs=self.epochs,
            max_steps=self.max_steps,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            patience=self.patience,
            seed=self.seed,
            device=self.device_,
            time_budget_s=self.time_budget_s,
            progress=progress,
            denoise=self.denoise,
        )
        self.pool_ = self.pool or default_pool(min(h, w))
        self._fit_error_statistics(X_train, X_hold)
        self.calibrate(self._raw_scores_and_maps(X_hold)[0], target_fpr=self.target_fpr)
        self._fit_heat_scale(X_hold)
        self.metadata = self._training_metadata(result, len(X_train), len(X_hold))
        self._model_id = None
        return self

    def _fit_error_statistics(self, X_train: np.ndarray, X_hold: np.ndarray) -> None:
        """Per-pixel error mean/std from training images; the views' spread from held-out ones.

        The views must be normalised on images the per-pixel statistics have not seen: on the
        training images those statistics fit their own noise, so training images look more
        normal than any new image, and a spread measured there is too narrow (measured on a
        synthetic set: new normals scored 1.4 standard deviations above training normals).
        """
        errs_list, codes_list = [], []
        for x in self._batches(X_train):  # one pass: errors and codes
            err, codes, _ = self._forward(x)
            errs_list.append(err)
            codes_list.append(pooled_code(codes).cpu() if self.model_.spatial else codes.cpu())
        errs = torch.cat(errs_list)
        mean = errs.mean(0)
        std = errs.std(0)
        # A floor keeps a pixel that happens to be perfectly reconstructed in training from
        # turning the slightest later error into an enormous z-score.
        std = torch.clamp(std, min=float(std.mean()) * 0.1 + 1e-8)
        self.err_mean_, self.err_std_ = mean.cpu(), std.cpu()
        self.latent_mean_ = self.latent_precision_ = self.code_bank_ = None
        self.view_weights_ = None
        codes = torch.cat(codes_list)
        if self.model_.spatial:
            self.views_ = ["mean", "local", "gradient", "code"]
            if len(codes) > MAX_CODE_BANK:
                keep = np.random.default_rng(self.seed).choice(len(codes), MAX_CODE_BANK, replace=False)
                codes = codes[np.sort(keep)]
            self.code_bank_ = codes.float().contiguous()
        else:
            from sklearn.covariance import LedoitWolf  # shrinkage: 32 dimensions, few images

            cov = LedoitWolf().fit(codes.double().numpy())
            self.latent_mean_ = torch.from_numpy(cov.location_).float()
            self.latent_precision_ = torch.from_numpy(cov.precision_).float()
            self.views_ = ["mean", "local", "latent"]
        if self.score != "all" and not SCORE_VIEWS[self.score] <= set(self.views_):
            raise ValueError(f"score {self.score!r} needs views this model does not have (it has {self.views_})")
        views = torch.cat([self._views(x)[0].cpu() for x in self._batches(X_hold)])
        self.view_mean_ = views.mean(0)
        self.view_std_ = torch.clamp(views.std(0), min=1e-8) if len(views) > 1 else torch.ones(views.shape[1])
        if self.model_.spatial:
            self.view_weights_ = torch.tensor([PHOTO_WEIGHTS.get(v, 0.0) for v in self.views_])

    def _fit_heat_scale(self, X_hold: np.ndarray) -> None:
        """Heat-map scale from normal images: below the 99th percentile of their maps nothing is
        drawn, so a normal image shows (almost) no heat; full red is far beyond anything normal."""
        maps = self._raw_scores_and_maps(X_hold)[1]
        lo = float(np.quantile(maps, 0.99))
        hi = float(maps.max())
        self.heat_vmin_ = lo
        self.heat_vmax_ = max(hi + (hi - lo), lo + 1e-6)

    def calibrate(self, normal_scores: np.ndarray, target_fpr: float | None = None) -> ConformalThreshold:
        """Set `threshold_` from scores of held-out normal images (see anomon.calibrate)."""
        fpr = self.target_fpr if target_fpr is None else target_fpr
        cal = ConformalThreshold(target_fpr=fpr).fit(normal_scores)
        self.target_fpr = fpr
        self.threshold_ = cal.threshold_
        self.calibration_scores_ = torch.from_numpy(cal.calibration_scores_.astype(np.float64))
        self.calibration_info_ = {
            "n": cal.n_calibration_,
            "target_fpr": fpr,
            "expected_fpr": cal.expected_fpr_,
            "guaranteed": bool(cal.guaranteed_),
            "calibrated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self._model_id = None
        return cal

    def _training_metadata(self, result: TrainResult, n_train: int, n_hold: int) -> dict[str, Any]:
        return {
            "n_train": n_train,
            "n_holdout": n_hold,
            "epochs_run": result.epochs_run,
            "best_epoch": result.best_epoch,
            "train_loss": result.train_loss,
            "val_loss": result.val_loss,
            "train_seconds": round(result.seconds, 2),
            "stopped_early": result.stopped_early,
            "steps_run": result.steps_run,
            "steps_planned": result.steps_planned,
            "stopped_by_budget": result.stopped_by_budget,
            "device": str(self.device_),
            "torch": torch.__version__,
            "anomon": __version__,
            "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    # ------------------------------------------------------------------ scoring
    def _check_fitted(self) -> None:
        if not hasattr(self, "threshold_"):
            raise NotFittedError("this Detector is not fitted yet: call fit() or Detector.load()")

    def _batches(self, X: np.ndarray) -> list[torch.Tensor]:
        bs = max(self.batch_size, 1)
        return [torch.from_numpy(np.ascontiguousarray(X[i : i + bs])) for i in range(0, len(X), bs)]

    @torch.inference_mode()
    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(N, H, W) squared error map, the latent codes (dense (N, D) or spatial (N, C, h, w)),
        and for spatial models the (N, H, W) gradient error map."""
        self.model_.eval()
        x = x.to(self.device_, dtype=torch.float32)
        codes = self.model_.encode(x)
        recon = self.model_.decode(codes, self.model_.stage_shapes(x))
        gerr = (gradient_magnitude(recon) - gradient_magnitude(x)).abs() if self.model_.spatial else None
        return ((recon - x) ** 2).mean(1), codes, gerr

    @torch.inference_mode()
    def _views(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(N, V) raw views in the order of `views_`, and the maps of the local views
        ([local] or [local, gradient], each (N, H, W)) that make the heat map."""
        err, codes, gerr = self._forward(x)
        z = (err - self.err_mean_.to(self.device_)) / self.err_std_.to(self.device_)
        smooth = box_filter(z[:, None], self.pool_)[:, 0]
        cols = [z.mean((1, 2)), smooth.amax((1, 2))]
        maps = [smooth]
        if not self.model_.spatial and getattr(self, "latent_mean_", None) is not None:
            d = codes - self.latent_mean_.to(codes.device)
            cols.append(((d @ self.latent_precision_.to(codes.device)) * d).sum(1).clamp(min=0).sqrt())
        if gerr is not None and "gradient" in self.views_:
            gsmooth = box_filter(gerr[:, None], GRADIENT_POOL)[:, 0]
            cols.append(gsmooth.amax((1, 2)))
            maps.append(gsmooth)
        if "code" in self.views_:
            cols.append(nearest_distance(pooled_code(codes), self.code_bank_.to(codes.device)))
        return torch.stack(cols, dim=1), maps

    def _view_z(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, V) views of a batch z-scored on held-out normals, and its (N, H, W) heat maps."""
        views, local_maps = self._views(x)
        mean, std = self.view_mean_.to(views.device), self.view_std_.to(views.device)
        # The heat map is the local views' maps on the scale of their z-scores, weighted as the
        # score weighs them: it shows where the evidence for the verdict lies.
        heat = torch.zeros_like(local_maps[0])
        for name, m in zip(("local", "gradient"), local_maps):
            i = self.views_.index(name)
            heat += self._weight(i) * (m - mean[i]) / std[i]
        return ((views - mean) / std).cpu(), heat.float().cpu()

    def _weight(self, i: int) -> float:
        if self.score != "all":
            return float(self.views_[i] in SCORE_VIEWS[self.score])
        if self.view_weights_ is not None:
            return float(self.view_weights_[i])
        if len(self.views_) == 3:  # dense models: the two pixel views together weigh as much as the code's
            return 0.5 if i < 2 else 1.0
        return 1.0

    def _combine(self, v: torch.Tensor) -> torch.Tensor:
        w = torch.tensor([self._weight(i) for i in range(v.shape[1])], dtype=v.dtype)
        return (v * w).sum(1)

    def _raw_scores_and_maps(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, maps = [], []
        for x in self._batches(X):
            v, heat = self._view_z(x)
            scores.append(self._combine(v).double())
            maps.append(heat)
        if not scores:
            return np.zeros(0), np.zeros((0, *self.input_shape), np.float32)
        return torch.cat(scores).numpy(), torch.cat(maps).numpy()

    def score_with_maps(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores (N,) and anomaly maps (N, H, W); higher = more anomalous."""
        self._check_fitted()
        return self._raw_scores_and_maps(np.asarray(X, dtype=np.float32))

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        return self.score_with_maps(X)[0]

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Score minus threshold: positive = anomalous (scikit-learn's outlier detectors use the
        opposite sign, positive = inlier; here higher always means more anomalous, like the score)."""
        return self.score_samples(X) - self.threshold_

    def predict(self, X: np.ndarray) -> np.ndarray:
        """1 = anomalous, 0 = normal."""
        return self.is_anomalous(self.score_samples(X)).astype(np.int64)

    def is_anomalous(self, scores: np.ndarray) -> np.ndarray:
        """The verdict for scores already computed; `predict` and every caller use this rule."""
        self._check_fitted()
        return exceeds(scores, self.threshold_)

    def assess(self, X: np.ndarray) -> Assessment:
        """Everything a verdict needs from one forward pass: scores, maps, p-values, verdicts."""
        scores, maps = self.score_with_maps(X)
        return Assessment(scores, maps, self.p_values(scores), self.is_anomalous(scores))

    def score_images(self, items: Iterable[Any], *, heatmaps: bool = False) -> list[Any]:
        """Score image files, PIL images or numpy arrays (H x W [x C], uint8 or float in [0, 1]):
        one `anomon.scoring.ScoreRecord` per item, in order, with score, threshold, anomalous,
        p_value and model_id, or `error`/`message` for an item that could not be read. The same
        path as `anomon score` and the daemon (anomon.scoring)."""
        from anomon.scoring import score_items

        self._check_fitted()
        return list(score_items(self, items, heatmaps=heatmaps))

    def p_values(self, scores: np.ndarray) -> np.ndarray:
        self._check_fitted()
        return conformal_p_values(self.calibration_scores_.numpy(), scores)

    def preprocess(self, img: Image.Image, name: str = "image") -> np.ndarray:
        """The model's input for one decoded image; ImageError("corrupt") if it will not convert."""
        return to_array(img, image_size=self.image_size, channels=self.channels, name=name)

    @property
    def heat_vmin(self) -> float:
        return self.heat_vmin_

    @property
    def heat_vmax(self) -> float:
        return self.heat_vmax_

    # ------------------------------------------------------------------ bundle
    def _tensors(self) -> dict[str, torch.Tensor]:
        t = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model_.state_dict().items()}
        t.update(
            {
                "stats.err_mean": self.err_mean_.contiguous(),
                "stats.err_std": self.err_std_.contiguous(),
                "stats.view_mean": self.view_mean_.contiguous(),
                "stats.view_std": self.view_std_.contiguous(),
                **({"stats.latent_mean": self.latent_mean_.contiguous(),
                    "stats.latent_precision": self.latent_precision_.contiguous()}
                   if getattr(self, "latent_mean_", None) is not None else {}),
                **({"stats.code_bank": self.code_bank_.contiguous()}
                   if getattr(self, "code_bank_", None) is not None else {}),
                "calibration.scores": self.calibration_scores_.contiguous(),
            }
        )
        return t

    def _meta(self) -> dict[str, Any]:
        return {
            "format": bundle.BUNDLE_FORMAT,
            "architecture": dict(self.model_.config),
            # A square size stays one number (the format of bundles before non-square sizes).
            "preprocessing": {
                "image_size": self.image_size if isinstance(self.image_size, int) else list(self.input_shape),
                "channels": self.channels,
                "resize": "bilinear",
            },
            "score": {
                "kind": self.score,
                "pool": self.pool_,
                "views": list(self.views_),
                **({"weights": [float(w) for w in self.view_weights_]} if self.view_weights_ is not None else {}),
            },
            "threshold": self.threshold_,
            "heat": {"vmin": self.heat_vmin_, "vmax": self.heat_vmax_},
            "calibration": self.calibration_info_,
            "training": self.metadata,
            "hyperparameters": {
                "epochs": self.epochs, "max_steps": self.max_steps, "batch_size": self.batch_size, "learning_rate": self.learning_rate,
                "patience": self.patience, "holdout": self.holdout, "seed": self.seed, "denoise": self.denoise,
            },
        }

    @property
    def model_id(self) -> str:
        self._check_fitted()
        if getattr(self, "_model_id", None) is None:
            self._model_id = bundle.content_id(self._meta(), self._tensors())
        return self._model_id

    def to_bytes(self) -> bytes:
        self._check_fitted()
        data, self._model_id = bundle.dumps(self._meta(), self._tensors())
        return data

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write the bundle atomically (temp file, fsync, rename, fsync dir); returns model_id."""
        atomic_write(Path(path), self.to_bytes())
        return self.model_id

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str = "auto") -> Detector:
        return cls.from_bytes(bundle.read(path), name=str(path), device=device)

    @classmethod
    def from_bytes(cls, data: bytes, *, name: str = "<bytes>", device: str = "auto") -> Detector:
        meta, tensors, model_id = bundle.loads(data, name)
        try:
            return cls._from_parts(meta, tensors, model_id, device)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise BundleError(f"{name}: model bundle is inconsistent ({type(e).__name__}: {e})") from None

    @classmethod
    def _from_parts(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], model_id: str, device: str) -> Detector:
        arch = meta["architecture"]
        hp = meta.get("hyperparameters", {})
        size = meta["preprocessing"]["image_size"]
        det = cls(
            image_size=int(size) if isinstance(size, (int, float)) else shape_of(size),
            channels=int(meta["preprocessing"]["channels"]),
            latent_dim=int(arch["latent_dim"]),
            width=int(arch["width"]),
            target_fpr=float(meta["calibration"]["target_fpr"]),
            score=meta["score"]["kind"],
            pool=int(meta["score"]["pool"]),
            **{k: hp[k] for k in ("epochs", "max_steps", "batch_size", "learning_rate", "patience", "holdout", "seed", "denoise") if k in hp},
        )
        det.device = device
        det.device_ = pick_device(device)
        det.model_ = ConvAutoencoder(**arch)
        det.model_.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        det.model_.to(det.device_).eval()
        det.pool_ = int(meta["score"]["pool"])
        det.err_mean_ = tensors["stats.err_mean"]
        det.err_std_ = tensors["stats.err_std"]
        det.view_mean_ = tensors["stats.view_mean"]
        det.view_std_ = tensors["stats.view_std"]
        det.latent_mean_ = tensors.get("stats.latent_mean")
        det.latent_precision_ = tensors.get("stats.latent_precision")
        det.code_bank_ = tensors.get("stats.code_bank")
        # Bundles written before views were named: two pixel views, plus the code's when dense.
        det.views_ = list(meta["score"].get("views") or (["mean", "local"] + (["latent"] if det.latent_mean_ is not None else [])))
        weights = meta["score"].get("weights")
        det.view_weights_ = torch.tensor(weights, dtype=torch.float32) if weights is not None else None
        if len(det.views_) != det.view_mean_.numel() or (weights is not None and len(weights) != len(det.views_)):
            raise ValueError(f"views {det.views_} do not match the stored view statistics")
        det.calibration_scores_ = tensors["calibration.scores"]
        det.threshold_ = float(meta["threshold"])
        det.heat_vmin_ = float(meta["heat"]["vmin"])
        det.heat_vmax_ = float(meta["heat"]["vmax"])
        det.calibration_info_ = dict(meta["calibration"])
        det.metadata = dict(meta.get("training", {}))
        det._model_id = model_id
        return det

    def warnings(self) -> list[str]:
        """What a user must know before trusting this model; shown by train, info and evaluate."""
        out = []
        t = self.metadata
        if t.get("stopped_by_budget"):
            out.append(
                f"training was cut short by its time budget after {t['steps_run']} of {t['steps_planned']} "
                f"optimiser steps ({t['train_seconds']:.0f} s): this model is weaker than planned; "
                "retrain with a larger --time-budget (or none), on a less busy machine, or with a GPU"
            )
        return out

    def info(self) -> dict[str, Any]:
        """Everything `anomon info` prints."""
        meta = self._meta()
        meta["model_id"] = self.model_id
        meta["warnings"] = self.warnings()
        meta["n_parameters"] = sum(p.numel() for p in self.model_.parameters())
        return meta


def holdout_size(n: int, share: float) -> int:
    """Images held out of training to standardise the views and calibrate: `share` of n, at least 1.

    Tried: at least 20 where that stays under 30% of the data, since the views' z-scores come from
    these images and a 33-image PIPED paper type holds out only 3. Mean AUROC over the 12 paper
    types went 0.938 -> 0.933 (bench/results/real_photos_min_holdout_experiment.md): the type-to-type
    spread is not the holdout's size, so the simple rule stays.
    """
    return max(1, int(round(n * share)))


def auto_image_size(sizes: list[tuple[int, int]], cap: int) -> int | tuple[int, int]:
    """The working size for `--image-size` auto, from the training images' (width, height).

    Square-ish or small images: a square of the median longest side, capped, at least 16.
    Elongated photos keep their aspect ratio, with as many pixels as a cap x cap square: squashing
    a 500x1260 commutator photo into 256x256 shrinks it 5x along its length and thins a crack
    across it to nothing, while 160x400 keeps 2.5x more detail along it for the same cost. Sides are
    multiples of 16, the model's stride.
    """
    if not sizes:
        return min(cap, 28)
    longest = sorted(max(w, h) for w, h in sizes)[len(sizes) // 2]
    square = int(max(16, min(cap, longest)))
    w = float(np.median([s[0] for s in sizes]))
    h = float(np.median([s[1] for s in sizes]))
    if max(w, h) / min(w, h) < 1.25 or longest <= 64:
        return square
    scale = min(1.0, cap / (w * h) ** 0.5)
    height, width = (max(16, int(round(v * scale / 16)) * 16) for v in (h, w))
    if min(height, width) <= 64:
        return square
    return height, width


__all__ = ["Detector", "BundleError", "NotFittedError", "auto_image_size", "default_pool", "holdout_size"]
