"""DRSP: DAIG's perturbation of feature statistics, for pre-training a CIR model on synthetic triplets.

Synthetic triplets carry the generator's style (colour cast, texture, lighting), which lives largely in
a feature's first two moments. DRSP (DAIG, CVPR 2026) treats each sample's feature mean and standard
deviation as uncertain: each is modelled as a Gaussian centred on the measured value, whose spread is
how much that statistic varies across the batch, and a new value is drawn by reparameterisation. The
feature is then re-normalised to the drawn statistics. It is the uncertainty modelling of DSU (Li et
al., "Uncertainty Modeling for Out-of-Distribution Generalization", ICLR 2022, github.com/lixiaotong97/DSU):

    mu, sigma      = mean and std of x over `dim`, per sample
    Sigma_mu^2     = variance of mu over the batch;  Sigma_sigma^2 = variance of sigma over the batch
    beta           = mu    + eps_1 * Sigma_mu,        eps_1 ~ N(0, 1)
    gamma          = sigma + eps_2 * Sigma_sigma,     eps_2 ~ N(0, 1)
    DRSP(x)        = gamma * (x - mu) / sigma + beta

so the output's own per-sample mean is beta ~ N(mu, Sigma_mu^2) and its std is |gamma| with
gamma ~ N(sigma, Sigma_sigma^2). The whole batch is perturbed with probability `p` (the paper: 0.5),
only in training mode; in eval mode, with p = 0, or for a batch of one (no spread to estimate) it
returns its input unchanged. The draw is differentiable (reparameterised), so gradients reach x.

DAIG perturbs the visual features (the style of a synthetic picture lives in them); the trainings apply it
to the reference image's features (`drsp_features="visual"`), or, ours, to the change's text features too
(`"visual+text"`). A pooled feature's statistics are taken over its width (`dim=-1`); a ViT's patch
features' per channel over the patches (`dim=1`), as DSU does over a feature map's positions.
"""

from __future__ import annotations

import torch
from torch import nn

from imageloop.errors import ConfigError
from imageloop.training.options import DEFAULT_PROBABILITY


class DRSP(nn.Module):
    """Perturb each sample's feature mean and std by draws from Gaussians fitted across the batch."""

    def __init__(self, p: float = DEFAULT_PROBABILITY, dim: int = -1, eps: float = 1e-6) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"DRSP probability must lie in [0, 1], got {p}")
        self.p = p
        self.dim = dim
        self.eps = eps

    def extra_repr(self) -> str:
        return f"p={self.p}, dim={self.dim}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x` (batch first) with perturbed per-sample statistics over `dim`, or `x` itself (see the module)."""
        if not self.training or self.p == 0.0 or x.shape[0] < 2:
            return x
        # One coin for the batch, from torch's generator, so a seeded run (and its resume) repeats exactly.
        if torch.rand((), device="cpu").item() >= self.p:
            return x
        mean = x.mean(dim=self.dim, keepdim=True)
        std = (x.var(dim=self.dim, keepdim=True, correction=0) + self.eps).sqrt()
        # The statistics' spread across the batch (unbiased: an estimate over the data the batch samples).
        mean_spread = (mean.var(dim=0, keepdim=True) + self.eps).sqrt()
        std_spread = (std.var(dim=0, keepdim=True) + self.eps).sqrt()
        beta = mean + torch.randn_like(mean) * mean_spread
        gamma = std + torch.randn_like(std) * std_spread
        return gamma * (x - mean) / std + beta
