import numpy as np
import pytest
import torch

from casam.model.router import FeatureVAE, Router, calibrate_tau, pool_embedding, train_vae


def _feats(seed, n, shift):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 256, generator=g) * 0.1 + shift


def test_vae_shapes_from_method():
    vae = FeatureVAE()
    assert vae.enc[0].in_features == 256 and vae.enc[0].out_features == 128
    assert vae.mu.out_features == 64 and vae.logvar.out_features == 64
    assert vae.dec[-1].out_features == 256 and vae.beta == 16.5
    assert pool_embedding(torch.ones(2, 256, 4, 4)).shape == (2, 256)


def test_in_distribution_scores_lower_and_tau_gates():
    a, b = _feats(0, 60, 0.0), _feats(1, 20, 1.0)
    vae = train_vae(a[:40])
    assert vae.score(a[40:]).mean() < vae.score(b).mean()
    tau, held = calibrate_tau(a[:40], groups=[str(i // 2) for i in range(40)])
    assert held.shape == (40,) and tau == pytest.approx(np.percentile(held, 97))
    r = Router([vae], [tau])
    assert r.route(b[0]).fallback and r.route(b[0]).best == 0


def test_router_argmin():
    a, b = _feats(0, 40, 0.0), _feats(1, 40, 1.0)
    va, vb = train_vae(a), train_vae(b)
    r = Router([va, vb], [1e9, 1e9])
    assert r.route(a[0]).index == 0 and r.route(b[0]).index == 1
    assert Router().route(a[0]).index is None
    with pytest.raises(ValueError):
        train_vae(a[:1])


def test_vae_training_is_deterministic():
    a = _feats(0, 30, 0.0)
    s1 = train_vae(a, seed=3).state_dict()
    s2 = train_vae(a, seed=3).state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
