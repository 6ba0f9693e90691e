"""The CA-SAM router: one small VAE per Alignment Layer on the pooled image embedding.

Score ``s_t(f) = MSE(f, D_t(μ_t(f))) + β·KL(q_t(z|f) ‖ N(0, I))`` (β = :data:`VAE_BETA`). The threshold τ_t is
the :data:`TAU_PERCENTILE`-th percentile of held-out scores from :data:`TAU_FOLDS`-fold cross-validation on the
layer's training set. At inference ``t* = argmin_t s_t(f)``; if ``s_t*(f) > τ_t*`` no layer fits and plain SAM is
used (identity fallback).

One addition to CA-SAM's recipe (docs/method.md): each VAE standardises its input with the per-channel mean and
standard deviation of its own training features (stored with the VAE). Pooled SAM embeddings vary very little
per channel, so on raw features the reconstruction error of a foreign image barely differs from a familiar one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

# The router VAE's shape and KL weight, as in the CA-SAM paper.
VAE_BETA = 16.5
VAE_HIDDEN = 128
VAE_LATENT = 64

# τ: this percentile of held-out scores, from this many cross-validation folds (CA-SAM's recipe).
TAU_PERCENTILE = 97.0
TAU_FOLDS = 5

# More epochs than the paper's code (10): a barely trained VAE lets images of a new modality through
# (docs/method.md).
VAE_EPOCHS = 100


def pool_embedding(z: torch.Tensor) -> torch.Tensor:
    """Router feature: the B×C×H×W embedding averaged over space → B×C."""
    return z.float().mean(dim=(-2, -1))


class FeatureVAE(nn.Module):
    """VAE on a pooled embedding: C → hidden (GELU) → (μ, log σ²) in ``latent``; latent → hidden (GELU) → C.

    Args:
        in_dim: feature size (256).
        hidden: hidden width (:data:`VAE_HIDDEN`).
        latent: latent size (:data:`VAE_LATENT`).
        beta: weight of the KL term in loss and score (:data:`VAE_BETA`).
    """

    def __init__(self, in_dim: int = 256, hidden: int = VAE_HIDDEN, latent: int = VAE_LATENT, beta: float = VAE_BETA):
        super().__init__()
        self.beta = float(beta)
        self.enc = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU())
        self.mu = nn.Linear(hidden, latent)
        self.logvar = nn.Linear(hidden, latent)
        self.dec = nn.Sequential(nn.Linear(latent, hidden), nn.GELU(), nn.Linear(hidden, in_dim))
        self.register_buffer("feat_mean", torch.zeros(in_dim))
        self.register_buffer("feat_std", torch.ones(in_dim))

    def set_normalization(self, features: torch.Tensor, eps: float = 1e-6) -> None:
        """Sets the input standardisation from training features (N×C): per-channel mean and std."""
        self.feat_mean.copy_(features.mean(0))
        if features.shape[0] < 2:
            self.feat_std.fill_(1.0)
            return
        std = features.std(0, unbiased=False)
        # floor: with few images some channels barely vary, and dividing by ~0 would make scores explode
        self.feat_std.copy_(std.clamp_min(max(eps, 0.1 * float(std.median()))))

    def terms(self, f: torch.Tensor, sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample reconstruction MSE and KL (each averaged over its dimensions), on standardised features."""
        f = (f - self.feat_mean) / self.feat_std
        h = self.enc(f)
        mu, logvar = self.mu(h), self.logvar(h).clamp(-20, 20)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
        mse = (self.dec(z) - f).pow(2).mean(dim=1)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).mean(dim=1)
        return mse, kl

    def loss(self, f: torch.Tensor) -> torch.Tensor:
        """Training loss (mean over the batch of MSE + β·KL with a reparameterised sample)."""
        mse, kl = self.terms(f, sample=True)
        return (mse + self.beta * kl).mean()

    @torch.no_grad()
    def score(self, f: torch.Tensor) -> torch.Tensor:
        """Deterministic novelty score per sample (decoder applied to μ): lower = more familiar."""
        mse, kl = self.terms(f, sample=False)
        return mse + self.beta * kl


def train_vae(features: torch.Tensor, epochs: int = VAE_EPOCHS, lr: float = 5e-4, batch_size: int = 6, seed: int = 0,
              beta: float = VAE_BETA) -> FeatureVAE:
    """Trains a :class:`FeatureVAE` on N×C features (Adam, batch 6 as in CA-SAM's code; 100 epochs here, 10 there:
    see ``casam.model.router.VAE_EPOCHS``).

    Args:
        features: N×C float tensor.
        epochs, lr, batch_size, seed, beta: training settings.

    Returns:
        The trained VAE in eval mode.

    Raises:
        ValueError: fewer than 2 features.
    """
    if features.shape[0] < 2:
        raise ValueError("a router VAE needs at least 2 training images")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = FeatureVAE(features.shape[1], beta=beta)
        vae.set_normalization(features)
        opt = torch.optim.Adam(vae.parameters(), lr=lr)
        vae.train()
        n = features.shape[0]
        for _ in range(epochs):
            order = torch.randperm(n, generator=g)
            for i in range(0, n, batch_size):
                batch = features[order[i : i + batch_size]]
                opt.zero_grad()
                vae.loss(batch).backward()
                opt.step()
    return vae.eval()


def calibrate_tau(features: torch.Tensor, groups: Optional[Sequence[str]] = None, folds: int = TAU_FOLDS,
                  percentile: float = TAU_PERCENTILE, seed: int = 0, **train_kw) -> tuple[float, np.ndarray]:
    """Threshold τ: the ``percentile`` of held-out scores from ``folds``-fold cross-validation.

    Folds are split by group (patient) when ``groups`` is given, so no patient is scored by a VAE that saw it.

    Args:
        features: N×C training features of one layer.
        groups: optional group id per feature (patient).
        folds: number of folds (5).
        percentile: percentile of the held-out scores (:data:`TAU_PERCENTILE`).
        seed: fold assignment and training seed.
        train_kw: passed to :func:`train_vae`.

    Returns:
        (τ, held-out scores of every sample).
    """
    n = features.shape[0]
    ids = np.asarray(groups if groups is not None else [str(i) for i in range(n)])
    if len(np.unique(ids)) < 2:  # one patient: folds by image (there is no other patient to hold out)
        ids = np.asarray([str(i) for i in range(n)])
    uniq = np.unique(ids)
    rng = np.random.default_rng(seed)
    rng.shuffle(uniq)
    k = max(2, min(folds, len(uniq)))
    fold_of = {g: i % k for i, g in enumerate(uniq)}
    fold = np.array([fold_of[g] for g in ids])
    held = np.full(n, np.nan, dtype=np.float64)
    for j in range(k):
        test = np.flatnonzero(fold == j)
        train = np.flatnonzero(fold != j)
        if len(test) == 0 or len(train) < 2:
            continue
        vae = train_vae(features[train], seed=seed + j, **train_kw)
        held[test] = vae.score(features[test]).numpy()
    if np.isnan(held).all():
        raise ValueError(f"cannot calibrate tau from {n} feature(s): at least 3 are needed")
    return float(np.nanpercentile(held, percentile)), held


@dataclass
class Route:
    """The router's decision for one image.

    Attributes:
        index: position of the chosen entry, or None for the plain-SAM fallback (or no entries).
        scores: the score of every entry.
        best: position of the lowest score (None when there are no entries).
    """

    index: Optional[int]
    scores: List[float]
    best: Optional[int]

    @property
    def fallback(self) -> bool:
        return self.index is None


class Router:
    """Selects an Alignment Layer by the lowest VAE score, with τ as the out-of-distribution gate.

    Args:
        vaes: one trained VAE per layer.
        taus: their thresholds.
    """

    def __init__(self, vaes: Sequence[FeatureVAE] = (), taus: Sequence[float] = ()):
        if len(vaes) != len(taus):
            raise ValueError("one τ per VAE")
        self.vaes = list(vaes)
        self.taus = [float(t) for t in taus]

    def __len__(self) -> int:
        return len(self.vaes)

    @torch.no_grad()
    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Returns the B×T score matrix of B features (B×C) under the T entries."""
        if not self.vaes:
            return torch.zeros(features.shape[0], 0)
        return torch.stack([v.score(features.float().cpu()) for v in self.vaes], dim=1)

    def route(self, feature: torch.Tensor) -> Route:
        """Routes one feature (C or 1×C)."""
        s = self.scores(feature.reshape(1, -1))[0].tolist()
        if not s:
            return Route(None, [], None)
        best = int(np.argmin(s))
        return Route(best if s[best] <= self.taus[best] else None, s, best)
