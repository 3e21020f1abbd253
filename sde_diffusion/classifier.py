"""A time-dependent classifier p_t(y | x_t) for noisy data, and its training loop.

Classifier guidance (math.md section 6) needs grad_x log p_t(y | x_t) at every noise level, so the
classifier is trained on x_t = gamma_t x_0 + sigma_t eps with t ~ U(t_min, T) and told the noise
level. It is conditioned on the log-SNR lambda_t rather than on t, and its input is scaled by
1 / sqrt(gamma_t^2 data_var + sigma_t^2), so that one architecture serves every SDE (VP inputs
stay near unit variance, VE inputs grow to sigma_max without the classifier noticing).

Vectors (data_shape = (D,)) get an MLP, images (C, H, W) a small strided conv net; in both, every
layer receives the noise-level features as an added bias (per unit or per channel).
`save_classifier` / `load_classifier` store one as safetensors with its architecture and SDE, so the
sampling app can guide a checkpoint with it (`guidance.kind=classifier`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ._tensor import append_dims
from .checkpoint import read_safetensors, sde_from_spec, sde_spec
from .sde import SDE

__all__ = ["NoisyClassifier", "load_classifier", "save_classifier", "train_classifier"]

_META_KEY = "sde_diffusion.noisy_classifier"


class NoisyClassifier(nn.Module):
    """Logits of p_t(y | x_t), called as classifier(x, t) with x of shape (batch, *data_shape).

    data_shape: (D,) for vectors (MLP of `depth` hidden layers of `width` units) or (C, H, W)
        for images (`depth` 3x3 convolutions, each halving the resolution after the first, with
        `width` channels doubling per level, then global average pooling).
    sde: the forward SDE the noisy inputs come from (gives gamma_t, sigma_t and lambda_t).
    data_var: the per-coordinate variance of clean data, for the input scaling.
    """

    def __init__(
        self,
        data_shape: Sequence[int],
        num_classes: int,
        sde: SDE,
        width: int = 128,
        depth: int = 3,
        time_features: int = 16,
        data_var: float = 1.0,
    ):
        super().__init__()
        self.data_shape = tuple(int(n) for n in data_shape)
        if len(self.data_shape) not in (1, 3) or min(self.data_shape) < 1:
            raise ValueError(f"data_shape must be (D,) or (C, H, W), got {self.data_shape}")
        for name, v, lo in (
            ("num_classes", num_classes, 2),
            ("width", width, 1),
            ("depth", depth, 1),
        ):
            if int(v) != v or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v}")
        if not (math.isfinite(data_var) and data_var > 0):
            raise ValueError(f"data_var must be a finite number > 0, got {data_var}")
        self.sde, self.data_var, self.num_classes = sde, float(data_var), int(num_classes)
        # the constructor's arguments (but the SDE), for save_classifier
        self.config = {
            "data_shape": list(self.data_shape),
            "num_classes": self.num_classes,
            "width": int(width),
            "depth": int(depth),
            "time_features": int(time_features),
            "data_var": self.data_var,
        }
        # fixed frequencies 0.05 .. 5 cover lambda from about -20 to 20 without aliasing
        freqs = torch.exp(torch.linspace(math.log(0.05), math.log(5.0), time_features))
        self.register_buffer("freqs", freqs, persistent=False)
        emb = 2 * time_features
        self.layers, self.biases = nn.ModuleList(), nn.ModuleList()
        if len(self.data_shape) == 1:
            sizes = [self.data_shape[0]] + [width] * depth
            for i in range(depth):
                self.layers.append(nn.Linear(sizes[i], sizes[i + 1]))
                self.biases.append(nn.Linear(emb, sizes[i + 1]))
        else:
            sizes = [self.data_shape[0]] + [width * 2**i for i in range(depth)]
            for i in range(depth):
                stride = 1 if i == 0 else 2
                self.layers.append(nn.Conv2d(sizes[i], sizes[i + 1], 3, stride, padding=1))
                self.biases.append(nn.Linear(emb, sizes[i + 1]))
        self.head = nn.Linear(sizes[-1], num_classes)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected (batch, *{self.data_shape})")
        t = self.sde.time(t, x).expand(x.shape[0])
        gamma, sigma = self.sde.marginal(t)
        h = x / append_dims(torch.sqrt(gamma**2 * self.data_var + sigma**2), x.ndim)
        arg = self.sde.log_snr(t)[:, None] * self.freqs.to(x.dtype)
        emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
        for layer, bias in zip(self.layers, self.biases, strict=True):
            h = F.silu(layer(h) + append_dims(bias(emb), h.ndim))
        if h.ndim == 4:
            h = h.mean(dim=(2, 3))
        return self.head(h)


def train_classifier(
    classifier: nn.Module,
    sde: SDE,
    x0: Tensor,
    labels: Tensor,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 2e-3,
    t_min: float | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> list[float]:
    """Fit classifier(x_t, t) to p_t(y | x_t) by cross-entropy on freshly noised data.

    Each step draws a batch of (x_0, y), t ~ U(t_min, T) (t_min defaults to sde.t_min) and
    eps ~ N(0, I) from `generator`, and takes an Adam step on the loss at x_t = perturb(x_0, t, eps).
    The learning rate decays by cosine annealing to zero. Returns the loss of every step.
    """
    if x0.shape[0] != labels.shape[0] or labels.ndim != 1:
        raise ValueError(
            f"labels must have shape ({x0.shape[0]},) to match x0 of shape {tuple(x0.shape)}, "
            f"got {tuple(labels.shape)}"
        )
    if int(steps) != steps or steps < 1 or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(
            f"steps and batch_size must be positive integers, got {steps}, {batch_size}"
        )
    t_lo = float(sde.t_min if t_min is None else t_min)
    if not 0 <= t_lo < sde.T:
        raise ValueError(f"t_min must lie in [0, T = {sde.T}), got {t_lo}")
    param = next(classifier.parameters())
    device, dtype = param.device, param.dtype
    opt = torch.optim.Adam(classifier.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(steps))
    classifier.train()
    losses = []
    for _ in tqdm(range(int(steps)), desc="classifier", disable=not progress, leave=False):
        idx = torch.randint(x0.shape[0], (int(batch_size),), generator=generator)
        x, y = x0[idx].to(device, dtype), labels[idx].to(device)
        t = t_lo + (sde.T - t_lo) * torch.rand(idx.shape[0], generator=generator, dtype=dtype)
        eps = torch.randn(x.shape, generator=generator, dtype=dtype).to(device)
        loss = F.cross_entropy(classifier(sde.perturb(x, t.to(device), eps), t.to(device)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    classifier.eval()
    return losses


def save_classifier(classifier: NoisyClassifier, path: str | Path) -> Path:
    """Write the classifier's weights, architecture and SDE to a safetensors file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = json.dumps({"config": classifier.config, "sde": sde_spec(classifier.sde)})
    tensors = {k: v.detach().cpu().contiguous() for k, v in classifier.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={_META_KEY: doc})
    tmp.replace(path)
    return path


def load_classifier(path: str | Path, device: torch.device | str | None = None) -> NoisyClassifier:
    """Rebuild a classifier written by `save_classifier`, in eval mode with frozen weights."""
    tensors, doc = read_safetensors(path, _META_KEY, "classifier", "save_classifier")
    meta = json.loads(doc)
    classifier = NoisyClassifier(sde=sde_from_spec(meta["sde"]), **meta["config"])
    classifier.load_state_dict(tensors)
    return classifier.to(device).eval().requires_grad_(False)
