"""FRA: DAIG's angular margin on matching pairs, for fine-tuning a CIR model on a few real triplets.

The batch contrastive loss of CIR training (CLIP4CIR, SPRC) scores query i against every target j by
cos(theta_ij) / tau and asks a softmax over j to pick j = i. FRA (DAIG, CVPR 2026) adds an angular
margin phi to the matching pairs only, as ArcFace does for class centres (Deng et al., CVPR 2019):

    logit_ij = cos(theta_ij + phi) / tau   if i == j   (the query and its own target)
             = cos(theta_ij) / tau          otherwise  (in-batch negatives)
    loss     = mean_i  -log softmax_j(logit_ij)[i]

A query must beat every negative by an angle phi, which pulls it tighter onto its target than plain
cross-entropy does; with few real triplets that keeps the fine-tuned space from collapsing onto them.
cos(theta + phi) is computed as cos(theta)cos(phi) - sin(theta)sin(phi), so no arccos (whose gradient
explodes at +-1) is taken; past theta + phi = pi, where cos(theta + phi) would rise again and reward a
worse match, ArcFace's linear continuation cos(theta) - phi * sin(phi) keeps the logit decreasing.
With phi = 0 this is exactly the plain contrastive loss DAIG pre-trains with.

DAIG's own phi and tau could not be found (the paper and its code were not reachable from here): the
defaults are ours, settable (`fra_margin`, `temperature`). tau = 0.01 is CLIP4CIR's logit scale of 100
for its Combiner; phi = 0.1 rad (about 5.7 degrees) is a small margin for a temperature that sharp. A model
with its own similarity and temperature (SPRC's maximum over query features, its learnable temperature)
widens its own cosines with `widen`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from imageloop.errors import ConfigError
from imageloop.training.options import DEFAULT_MARGIN, DEFAULT_TEMPERATURE


class FRALoss(nn.Module):
    """Contrastive loss over in-batch negatives with an angular margin on the matching (diagonal) pairs."""

    def __init__(self, margin: float = DEFAULT_MARGIN, temperature: float = DEFAULT_TEMPERATURE) -> None:
        super().__init__()
        if not 0.0 <= margin < math.pi:
            raise ConfigError(f"FRA margin must lie in [0, pi) radians, got {margin}")
        if temperature <= 0.0:
            raise ConfigError(f"FRA temperature must be positive, got {temperature}")
        self.margin = margin
        self.temperature = temperature

    def extra_repr(self) -> str:
        return f"margin={self.margin}, temperature={self.temperature}"

    def logits(self, query: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The (batch, batch) logits: cosines over tau, the diagonal's angle widened by the margin."""
        return self.widen(F.normalize(query, dim=-1) @ F.normalize(target, dim=-1).T) / self.temperature

    def widen(self, cosine: torch.Tensor) -> torch.Tensor:
        """(batch, batch) cosines of queries and targets with the matching (diagonal) angles widened by phi."""
        if self.margin == 0.0:
            return cosine
        matching = cosine.diagonal()
        sine = (1.0 - matching.square()).clamp_min(1e-7).sqrt()
        widened = matching * math.cos(self.margin) - sine * math.sin(self.margin)
        # theta + phi > pi exactly when cos(theta) < cos(pi - phi).
        beyond = matching < math.cos(math.pi - self.margin)
        widened = torch.where(beyond, matching - self.margin * math.sin(self.margin), widened)
        diagonal = torch.eye(cosine.shape[0], dtype=torch.bool, device=cosine.device)
        return torch.where(diagonal, torch.diag_embed(widened), cosine)

    def forward(self, query: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of each query picking its own target among the batch's targets."""
        labels = torch.arange(query.shape[0], device=query.device)
        return F.cross_entropy(self.logits(query, target), labels)
