"""DRSP and FRA, DAIG's training devices, checked against their formulas."""

from __future__ import annotations

import itertools
import math

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from imageloop.errors import ConfigError  # noqa: E402
from imageloop.training.drsp import DRSP  # noqa: E402
from imageloop.training.fra import FRALoss  # noqa: E402
from imageloop.training.options import DEFAULT_MARGIN, DEFAULT_PROBABILITY, DEFAULT_TEMPERATURE  # noqa: E402


def features(batch: int, width: int, seed: int = 0) -> torch.Tensor:
    """Rows with their own mean (around 0) and std (between 0.5 and 1.5), as real features have."""
    generator = torch.Generator().manual_seed(seed)
    shape = torch.randn(batch, width, generator=generator)
    means = torch.randn(batch, 1, generator=generator)
    stds = 0.5 + torch.rand(batch, 1, generator=generator)
    return shape * stds + means


def row_stats(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(dim=dim), x.var(dim=dim, correction=0).sqrt()


# --- DRSP ---------------------------------------------------------------------------------------


def test_drsp_is_the_identity_in_eval_mode() -> None:
    x = features(8, 16)
    assert DRSP(p=1.0).eval()(x) is x


def test_drsp_is_the_identity_when_disabled() -> None:
    x = features(8, 16)
    assert DRSP(p=0.0).train()(x) is x


def test_drsp_leaves_a_batch_of_one_alone_having_no_spread_to_model() -> None:
    x = features(1, 16)
    assert DRSP(p=1.0).train()(x) is x


def test_drsp_perturbs_about_half_the_batches_at_the_papers_probability() -> None:
    assert DEFAULT_PROBABILITY == 0.5
    drsp = DRSP().train()
    x = features(4, 16)
    torch.manual_seed(0)
    perturbed = sum(drsp(x) is not x for _ in range(1000))
    assert 450 <= perturbed <= 550


def test_drsp_draws_each_samples_mean_and_std_from_gaussians_spread_as_the_batch() -> None:
    x = features(4096, 64)
    torch.manual_seed(0)
    out = DRSP(p=1.0).train()(x)
    mean, std = row_stats(x)
    new_mean, new_std = row_stats(out)
    # The modelled Gaussians: N(mu_b, Var_batch(mu)) and N(sigma_b, Var_batch(sigma)).
    for old, new in ((mean, new_mean), (std, new_std)):
        z = (new - old) / old.var(correction=1).sqrt()
        assert abs(z.mean().item()) < 0.05
        assert abs(z.std().item() - 1.0) < 0.05
        assert abs((z.abs() < 1).float().mean().item() - 0.6827) < 0.03


def test_drsp_changes_only_the_first_two_moments_along_its_dimension() -> None:
    tokens = features(32, 12 * 8).reshape(32, 12, 8)  # (batch, tokens, channels): statistics over tokens
    torch.manual_seed(1)
    out = DRSP(p=1.0, dim=1).train()(tokens)

    def standardised(t: torch.Tensor) -> torch.Tensor:
        return (t - t.mean(dim=1, keepdim=True)) / t.var(dim=1, keepdim=True, correction=0).sqrt()

    assert not torch.allclose(out.mean(dim=1), tokens.mean(dim=1))
    # Drawn stds may come out negative (gamma is a Gaussian draw), which flips the standardised shape.
    assert torch.allclose(standardised(out).abs(), standardised(tokens).abs(), atol=1e-4)


def test_drsp_lets_gradients_reach_its_input() -> None:
    x = features(8, 16).requires_grad_()
    torch.manual_seed(0)
    (DRSP(p=1.0).train()(x) ** 2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_drsp_refuses_a_probability_outside_zero_to_one() -> None:
    with pytest.raises(ConfigError, match="probability"):
        DRSP(p=1.5)


# --- FRA ----------------------------------------------------------------------------------------


def pairs(batch: int = 6, width: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, width, generator=generator)
    target = query + 0.8 * torch.randn(batch, width, generator=generator)  # matching pairs are close
    return query, target


def test_fra_widens_the_angle_of_the_matching_pairs_only() -> None:
    query, target = pairs()
    margin, temperature = 0.3, 0.05
    cosine = F.normalize(query, dim=-1) @ F.normalize(target, dim=-1).T
    logits = FRALoss(margin, temperature).logits(query, target)
    off_diagonal = ~torch.eye(6, dtype=torch.bool)
    assert torch.allclose(logits[off_diagonal], cosine[off_diagonal] / temperature, atol=1e-5)
    expected = torch.cos(torch.arccos(cosine.diagonal()) + margin) / temperature
    assert torch.allclose(logits.diagonal(), expected, atol=1e-4)


def test_fra_without_a_margin_is_the_plain_contrastive_loss() -> None:
    query, target = pairs()
    cosine = F.normalize(query, dim=-1) @ F.normalize(target, dim=-1).T
    plain = F.cross_entropy(cosine / 0.07, torch.arange(6))
    assert torch.allclose(FRALoss(margin=0.0, temperature=0.07)(query, target), plain)


def test_fra_lets_gradients_reach_queries_and_targets() -> None:
    query, target = (t.requires_grad_() for t in pairs())
    FRALoss(margin=0.5)(query, target).backward()
    for tensor in (query, target):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0


def test_fra_scores_a_worse_match_lower_even_past_pi_minus_the_margin() -> None:
    margin = 0.5
    loss = FRALoss(margin=margin, temperature=1.0)
    angles = torch.linspace(0.0, math.pi, 200)
    # A batch of one: the diagonal is the single matching pair at each angle.
    logits = [
        loss.logits(torch.tensor([[1.0, 0.0]]), torch.tensor([[math.cos(a), math.sin(a)]])).item() for a in angles
    ]
    assert all(later < earlier for earlier, later in itertools.pairwise(logits))


def test_fra_defaults_are_documented_and_both_knobs_are_settable() -> None:
    assert (FRALoss().margin, FRALoss().temperature) == (DEFAULT_MARGIN, DEFAULT_TEMPERATURE)
    assert (FRALoss(0.2, 0.1).margin, FRALoss(0.2, 0.1).temperature) == (0.2, 0.1)
    with pytest.raises(ConfigError, match="temperature"):
        FRALoss(temperature=0.0)
