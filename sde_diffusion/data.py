"""Built-in datasets, all offline, and loaders for the user's own data.

- 2-D toys: swiss_roll, two_moons, eight_gaussians, checkerboard, pinwheel, circles, spirals,
  gaussian_grid (drawn with a torch.Generator, scaled to roughly unit spread);
- gmm: the oracle's Gaussian mixtures (a ring or a random mixture), whose score is exact;
- digits: scikit-learn's 8x8 handwritten digits (1797 images, shipped inside scikit-learn), with
  labels, as (1, 8, 8) images in [-1, 1];
- folder: the user's PNG/JPEG images, or a .npy/.npz array, scaled to [-1, 1].

`load_data(DataConfig)` returns a `DataSplit` with a held-out part for evaluation. `batches`
yields training batches forever through a DistributedSampler, so one code path serves a single
process and torchrun; the order is a pure function of (seed, epoch), which makes resume exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DistributedSampler

from .oracle import GaussianMixture

TOYS = (
    "swiss_roll",
    "two_moons",
    "eight_gaussians",
    "checkerboard",
    "pinwheel",
    "circles",
    "spirals",
    "gaussian_grid",
)
DATASETS = (*TOYS, "gmm", "digits", "folder")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

__all__ = [
    "DATASETS",
    "TOYS",
    "DataConfig",
    "DataSplit",
    "batches",
    "load_array",
    "load_data",
    "load_image_folder",
    "toy_data",
]


@dataclass
class DataConfig:
    """What to train on.

    name: one of DATASETS. n: number of samples drawn for toys and gmm. holdout: fraction kept
    out of training for evaluation. seed: seeds the draw and the split. gmm: 'ring' or
    'random' with gmm_components / gmm_dim. path/image_size/channels: for 'folder'
    (image_size 0 keeps the files' size; channels 1 or 3).
    """

    name: str = "swiss_roll"
    n: int = 20000
    holdout: float = 0.1
    seed: int = 0
    gmm: str = "ring"
    gmm_components: int = 8
    gmm_dim: int = 2
    path: str = ""
    image_size: int = 0
    channels: int = 1

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"unknown dataset {self.name!r}; valid choices: {', '.join(DATASETS)}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"data.holdout must lie in [0, 1), got {self.holdout}")
        if self.n < 1:
            raise ValueError(f"data.n must be >= 1, got {self.n}")
        if self.gmm not in ("ring", "random"):
            raise ValueError(f"data.gmm must be 'ring' or 'random', got {self.gmm!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"data.channels must be 1 or 3, got {self.channels}")
        if self.name == "folder" and not self.path:
            raise ValueError(
                "data.path must name a folder of images or a .npy/.npz file for data=folder"
            )


@dataclass
class DataSplit:
    """Training and held-out samples (float32, shape (n, *shape)), labels when the data has them."""

    train: Tensor
    test: Tensor
    train_labels: Tensor | None = None
    test_labels: Tensor | None = None
    num_classes: int = 0
    info: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])


def toy_data(name: str, n: int, generator: torch.Generator | None = None) -> Tensor:
    """n points of a 2-D toy distribution, float32, shape (n, 2), spread about unit scale."""
    g = generator
    if name == "swiss_roll":
        u = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g))
        x = torch.stack([u * torch.cos(u), u * torch.sin(u)], dim=1)
        return (x + 0.5 * torch.randn(n, 2, generator=g)) / 7.5
    if name == "two_moons":
        u = math.pi * torch.rand(n, generator=g)
        upper = torch.rand(n, generator=g) < 0.5
        x = torch.where(
            upper[:, None],
            torch.stack([torch.cos(u), torch.sin(u)], 1),
            torch.stack([1 - torch.cos(u), 0.5 - torch.sin(u)], 1),
        )
        return (x + 0.05 * torch.randn(n, 2, generator=g) - torch.tensor([0.5, 0.25])) / 0.6
    if name == "eight_gaussians":
        return GaussianMixture.ring(8, radius=2.0, std=0.15).sample(n, g).float()
    if name == "checkerboard":
        # uniform on the black squares of a 4x4 board over [-2, 2]^2
        a = 4 * torch.rand(n, generator=g) - 2
        b = torch.rand(n, generator=g) - 2 * torch.randint(0, 2, (n,), generator=g)
        return torch.stack([a, b + torch.floor(a) % 2], dim=1)
    if name == "pinwheel":
        # 5 arms, each a Gaussian (radial sd 0.3, tangential sd 0.05) about radius 1, turned by
        # an angle growing with the radius (Johnson et al. 2016)
        arm = torch.randint(0, 5, (n,), generator=g)
        r = 1 + 0.3 * torch.randn(n, generator=g)
        angle = 2 * math.pi * arm / 5 + 0.25 * torch.exp(r)
        v = torch.stack([r, 0.05 * torch.randn(n, generator=g)], 1)
        c, s = torch.cos(angle), torch.sin(angle)
        return torch.stack([c * v[:, 0] - s * v[:, 1], s * v[:, 0] + c * v[:, 1]], 1) * 1.5
    if name == "circles":
        # two concentric circles of radii 2 and 1, noise sd 0.05
        u = 2 * math.pi * torch.rand(n, generator=g)
        r = 1.0 + (torch.rand(n, generator=g) < 0.5)
        x = r[:, None] * torch.stack([torch.cos(u), torch.sin(u)], 1)
        return x + 0.05 * torch.randn(n, 2, generator=g)
    if name == "spirals":
        # two interleaved Archimedean spirals, noise sd 0.05
        u = torch.sqrt(torch.rand(n, generator=g)) * 3 * math.pi
        sign = 1 - 2 * (torch.rand(n, generator=g) < 0.5).float()
        x = sign[:, None] * torch.stack([u * torch.cos(u), u * torch.sin(u)], 1) / (1.5 * math.pi)
        return x + 0.05 * torch.randn(n, 2, generator=g)
    if name == "gaussian_grid":
        # 25 Gaussians of sd 0.05 on a 5 x 5 grid over [-2, 2]^2
        centres = torch.randint(0, 5, (n, 2), generator=g).float() - 2
        return centres + 0.05 * torch.randn(n, 2, generator=g)
    raise ValueError(f"unknown toy {name!r}; valid choices: {', '.join(TOYS)}")


def _scale_to_unit(a: np.ndarray) -> np.ndarray:
    """Integer data (8-bit images) maps [0, 255] to [-1, 1]; float data its own [min, max]."""
    if np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_:
        return a.astype(np.float32) / 127.5 - 1.0
    a = a.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError("the data array contains NaN or inf")
    return (a - lo) / max(hi - lo, 1e-12) * 2.0 - 1.0


def load_array(path: str | Path) -> tuple[Tensor, Tensor | None]:
    """Samples (and labels 'y' if present) from a .npy or .npz file, scaled to [-1, 1].

    Images stored channels-last, (n, H, W, C) with C in {1, 3, 4}, become (n, C, H, W); (n, H, W)
    becomes (n, 1, H, W); other shapes are kept (point clouds: (n, D)).
    """
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as z:
            keys = [k for k in z.files if k != "y"]
            key = "x" if "x" in z.files else keys[0] if len(keys) == 1 else None
            if key is None:
                raise ValueError(
                    f"{path} holds arrays {z.files}; name the samples 'x' (labels 'y')"
                )
            a, y = z[key], (z["y"] if "y" in z.files else None)
    elif path.suffix == ".npy":
        a, y = np.load(path, allow_pickle=False), None
    else:
        raise ValueError(f"{path}: expected a .npy or .npz file")
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4 and a.shape[-1] in (1, 3, 4) and a.shape[1] not in (1, 3, 4):
        a = a.transpose(0, 3, 1, 2)
    x = torch.from_numpy(np.ascontiguousarray(_scale_to_unit(a)))
    return x, (torch.as_tensor(y, dtype=torch.long) if y is not None else None)


def load_image_folder(path: str | Path, image_size: int = 0, channels: int = 1) -> Tensor:
    """All PNG/JPEG files below `path` as a (n, channels, H, W) tensor in [-1, 1].

    image_size > 0 resizes (bicubic) to image_size x image_size; otherwise every image must
    already have the same size.
    """
    from PIL import Image

    files = sorted(p for p in Path(path).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no {'/'.join(IMAGE_SUFFIXES)} files found under {path}")
    arrays = []
    for f in files:
        with Image.open(f) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if image_size:
                im = im.resize((image_size, image_size), Image.Resampling.BICUBIC)
            arrays.append(np.asarray(im, dtype=np.uint8).reshape(im.height, im.width, channels))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(
            f"images under {path} differ in size {sorted(shapes)}; set data.image_size"
        )
    a = np.stack(arrays).transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(_scale_to_unit(a)))


def _digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # pixel values 0..16
    return x, torch.as_tensor(d.target, dtype=torch.long)


def load_data(cfg: DataConfig) -> DataSplit:
    """Load (or draw) the dataset of `cfg` and split off cfg.holdout of it, seeded by cfg.seed."""
    g = torch.Generator().manual_seed(cfg.seed)
    labels, num_classes, info = None, 0, {"name": cfg.name}
    if cfg.name in TOYS:
        x = toy_data(cfg.name, cfg.n, g)
    elif cfg.name == "gmm":
        gmm = (
            GaussianMixture.ring(cfg.gmm_components, dim=cfg.gmm_dim)
            if cfg.gmm == "ring"
            else GaussianMixture.random(cfg.gmm_components, cfg.gmm_dim, g)
        )
        x, labels = gmm.sample(cfg.n, g, return_labels=True)
        x, num_classes, info["oracle"] = x.float(), gmm.num_components, gmm
    elif cfg.name == "digits":
        x, labels = _digits()
        num_classes = 10
    elif Path(cfg.path).is_dir():
        x = load_image_folder(cfg.path, cfg.image_size, cfg.channels)
    else:
        x, labels = load_array(cfg.path)
        num_classes = int(labels.max()) + 1 if labels is not None else 0
    n_test = round(cfg.holdout * x.shape[0])
    perm = torch.randperm(x.shape[0], generator=g)
    tr, te = perm[n_test:], perm[:n_test]
    if tr.numel() == 0:
        raise ValueError(
            f"data.holdout = {cfg.holdout} leaves no training samples out of {x.shape[0]}"
        )
    return DataSplit(
        train=x[tr],
        test=x[te],
        train_labels=labels[tr] if labels is not None else None,
        test_labels=labels[te] if labels is not None else None,
        num_classes=num_classes,
        info=info,
    )


def batches(
    x: Tensor,
    labels: Tensor | None,
    batch_size: int,
    seed: int = 0,
    start_step: int = 0,
    num_replicas: int = 1,
    rank: int = 0,
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Endless shuffled batches of this rank's share of (x, labels), starting at start_step.

    Epoch e's order is DistributedSampler's permutation for (seed, e); incomplete last batches
    are dropped. Batch k of the stream is always the same, so resuming at start_step continues
    the stream exactly.
    """
    sampler = DistributedSampler(
        range(x.shape[0]),
        num_replicas=num_replicas,
        rank=rank,
        shuffle=True,
        seed=seed,
        drop_last=True,
    )
    per_epoch = len(sampler) // batch_size
    if per_epoch == 0:
        raise ValueError(
            f"batch size {batch_size} exceeds the {len(sampler)} training samples per process"
        )
    epoch, offset = divmod(start_step, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        idx = torch.as_tensor(list(sampler), dtype=torch.long)
        for k in range(offset, per_epoch):
            b = idx[k * batch_size : (k + 1) * batch_size]
            yield x[b], (labels[b] if labels is not None else None)
        epoch, offset = epoch + 1, 0
