"""Tests for kdlaplace: every numerical routine against a brute-force float64 reference, then the networks,
the data loaders on tiny datasets written in their real formats, and the scripts end to end."""
import ast
import copy
import csv
import itertools
import json
import math
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bench
import sweep
import eval as evaluate_script
import kdlaplace as K
import train  # the scripts are importable: their work happens in main()

torch.set_num_threads(2)
HERE = Path(__file__).resolve().parent
f64 = torch.float64


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_head(n: int = 40, p: int = 6, c: int = 4, seed: int = 0, scale: float = 1.0):
    """A softmax head's inputs and parameters, float64: features (N, p), weight (c, p), bias (c,) and labels (N,)."""
    g = seeded(seed)
    return (torch.randn(n, p, generator=g, dtype=f64), scale * torch.randn(c, p, generator=g, dtype=f64),
            torch.randn(c, generator=g, dtype=f64), torch.randint(0, c, (n,), generator=g))


# ── Losses ──────────────────────────────────────────────────────────────────────────────────────────────────────────

def test_kd_loss_and_student_loss_match_hand_written_kl_and_ce_with_0_log_0_equal_to_0():
    g = seeded(1)
    student = torch.randn(6, 7, generator=g, dtype=f64, requires_grad=True)
    teacher = torch.randn(6, 7, generator=g, dtype=f64)
    teacher[:3, 1] = -math.inf  # classes the teacher rules out (log 0), and a row with all but one ruled out
    teacher[2, [0, 3, 4, 5, 6]] = -math.inf
    y, weights = torch.randint(0, 7, (6,), generator=g), torch.rand(6, generator=g, dtype=f64) + 0.5
    T, lam = 2.5, 0.3
    loss = K.kd_loss(student, teacher, T)
    q_t = torch.exp(teacher / T) / torch.exp(teacher / T).sum(-1, keepdim=True)
    q_s = torch.exp(student / T) / torch.exp(student / T).sum(-1, keepdim=True)
    kl = torch.tensor([T ** 2 * sum(q * (math.log(q) - math.log(s)) for q, s in zip(q_row, s_row) if q > 0)
                       for q_row, s_row in zip(q_t.tolist(), q_s.tolist())], dtype=f64)
    torch.testing.assert_close(loss, kl, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(loss.sum(), student)  # d/dz_s of T^2 KL = T (q_s - q_t), per sample: no NaN
    torch.testing.assert_close(grad, T * (q_s - q_t).detach(), rtol=1e-10, atol=1e-12)
    assert torch.allclose(K.kd_loss(teacher[3:], teacher[3:], T), torch.zeros(3, dtype=f64), atol=1e-12)
    ce = -(student[torch.arange(6), y] - student.exp().sum(-1).log())  # -log softmax(z)_y, written out
    for w in (weights, None):  # the per-sample weighted mix, averaged
        expected = ((1 - lam) * ce + lam * kl) * (1 if w is None else w)
        torch.testing.assert_close(K.student_loss(student, teacher, y, w, lam, T), expected.mean())
    with pytest.raises(ValueError, match="teacher_logits"):  # logits of another class count would broadcast
        K.kd_loss(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)
    student, teacher = torch.randn(2, 3, 4, generator=g).bfloat16()  # bf16 inputs: the KL still in fp32
    p_t = torch.softmax(teacher.double() / 3, -1)  # the bf16 inputs' exact values, then float64 by hand
    expected = 9 * (p_t * (p_t.log() - torch.log_softmax(student.double() / 3, -1))).sum(-1)
    loss = K.kd_loss(student, teacher, 3.0)
    assert loss.dtype == torch.float32  # a bf16 KL would be off by about 1e-2 relative, not 1e-6
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)


def test_confidence_margin_dedier_weights_and_group_dro_hand_worked():
    probs = torch.tensor([[0.7, 0.2, 0.1],    # right (y=0): weight 1
                          [0.1, 0.6, 0.3],    # wrong (y=2): margin 0.3
                          [0.25, 0.25, 0.5],  # wrong (y=1): margin 0.25
                          [0.5, 0.5, 0.0]],   # argmax 0 = y: right
                         dtype=f64)
    torch.testing.assert_close(K.confidence_margin(probs), torch.tensor([0.5, 0.3, 0.25, 0.0], dtype=f64))
    weights = K.dedier_weights(probs, torch.tensor([0, 2, 1, 0]), alpha=0.5, beta=2.0)
    expected = torch.tensor([1.0, math.exp(2 * 0.3 ** 0.5), math.exp(2 * 0.25 ** 0.5), 1.0], dtype=f64)
    torch.testing.assert_close(weights, expected, rtol=1e-14, atol=0)
    old = torch.full((3,), 1 / 3, dtype=f64)  # the group weights before the step
    loss, new = K.group_dro_loss(torch.tensor([1.0, 3.0, 2.0, 4.0], dtype=f64), torch.tensor([0, 0, 2, 2]), old, 0.1)
    group_loss = torch.tensor([2.0, 0.0, 3.0], dtype=f64)  # each group's mean loss; group 1 has no sample
    q = old * torch.exp(0.1 * group_loss)
    torch.testing.assert_close(new, q / q.sum())
    torch.testing.assert_close(loss, (q / q.sum() * group_loss).sum())


def test_laplace_kd_targets_stay_finite_where_probabilities_underflow():
    # logits [15, 0, -20] at T = 0.3: p(-20) ~ exp(-117) is 0 in float32, and log(0) * 0 made the KL NaN
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, -1.0]])
    weight, bias = torch.tensor([[15.0, 0.0], [0.0, 0.0], [-20.0, 0.0]]), torch.zeros(3)
    laplace = K.KFACLaplace.fit(features, weight, bias, prior_precision=1e4, temperature=0.3)
    log_p = laplace.predict(features[:1], link="probit", log=True)  # (1, 3) float32
    assert torch.log(laplace.predict(features[:1], link="probit"))[0, 2] == -math.inf  # why log space is needed
    posterior = dense_posterior(features.double(), weight.double(), bias.double(), 1e4)
    expected = reference_predictive(features[:1].double(), *posterior, 0.3)[0].log()  # float64, by hand
    torch.testing.assert_close(log_p[0].double(), expected, rtol=1e-5, atol=1e-3)
    assert expected[2] < -100  # far below float32's smallest probability
    assert torch.isfinite(K.kd_loss(torch.randn(1, 3), log_p, T=3.0)).all()


# ── KFAC Laplace ────────────────────────────────────────────────────────────────────────────────────────────────────

def dense_posterior(features, weight, bias, prior_precision):
    """Reference factors from per-sample loops and dense inverses: (W~ (c, p+1), U (c, c), V (p+1, p+1))."""
    n = features.shape[0]
    phi = torch.cat([features, torch.ones(n, 1, dtype=f64)], 1)  # (N, p+1)
    A = sum(torch.outer(row, row) for row in phi) / n
    G = sum(torch.diag(p) - torch.outer(p, p) for p in torch.softmax(features @ weight.T + bias, -1)) / n
    root_tau = math.sqrt(prior_precision)
    U = torch.linalg.inv(math.sqrt(n) * G + root_tau * torch.eye(G.shape[0], dtype=f64))
    V = torch.linalg.inv(math.sqrt(n) * A + root_tau * torch.eye(A.shape[0], dtype=f64))
    return torch.cat([weight, bias[:, None]], 1), U, V


def reference_predictive(features, weight_tilde, U, V, temperature, normal=None):
    """Probit (normal=None) or MC predictive by an explicit loop, float64: (N, c); (N, G, c) for temperatures (G, 1)."""
    out = []
    for phi in torch.cat([features, torch.ones(features.shape[0], 1, dtype=f64)], 1):
        mean, v = weight_tilde @ phi, float(phi @ V @ phi)
        if normal is None:
            kappa = 1 / torch.sqrt(1 + math.pi / 8 * v * torch.diagonal(U) / temperature ** 2)
            out.append(torch.softmax(mean / temperature * kappa, -1))
        else:
            L = torch.linalg.cholesky(U)
            out.append(sum(torch.softmax((mean + math.sqrt(v) * L @ g) / temperature, -1) for g in normal) / len(normal))
    return torch.stack(out)


def test_kfac_factors_posterior_and_logit_distribution_match_per_sample_loops_and_the_dense_inverse():
    features, weight, bias, _ = random_head()
    laplace = K.KFACLaplace.fit(features, weight, bias, prior_precision=2.0)
    A, G = torch.zeros(7, 7, dtype=f64), torch.zeros(4, 4, dtype=f64)
    for n in range(40):
        phi, p = torch.cat([features[n], torch.ones(1, dtype=f64)]), torch.softmax(weight @ features[n] + bias, -1)
        A += torch.outer(phi, phi)
        G += torch.diag(p) - torch.outer(p, p)
    torch.testing.assert_close(laplace.A, A / 40, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(laplace.G, G / 40, rtol=1e-12, atol=1e-12)
    assert laplace.n == 40 and laplace.weight.shape == (4, 7)
    # the posterior covariance U (x) V inverts the precision (sqrt(n) G + sqrt(tau) I) (x) (sqrt(n) A + sqrt(tau) I)
    covariance = torch.linalg.inv(torch.kron(math.sqrt(40) * G / 40 + math.sqrt(2.0) * torch.eye(4, dtype=f64),
                                             math.sqrt(40) * A / 40 + math.sqrt(2.0) * torch.eye(7, dtype=f64)))
    torch.testing.assert_close(torch.kron(laplace.factor("U"), laplace.factor("V")), covariance, rtol=1e-9, atol=1e-12)
    mean, scale = laplace.logit_distribution(features[:4])
    for i, phi in enumerate(torch.cat([features[:4], torch.ones(4, 1, dtype=f64)], 1)):
        jacobian = torch.kron(torch.eye(4, dtype=f64), phi[None])  # f = (I (x) phi^T) vec W~, row-major vec
        torch.testing.assert_close(scale[i] * laplace.factor("U"), jacobian @ covariance @ jacobian.T,
                                   rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(mean, features[:4] @ weight.T + bias)


def test_kfac_ggn_per_sample_is_the_exact_hessian():
    # the closed form rests on this: for a softmax head the CE Hessian wrt vec(W~) is (diag p - p p^T) (x) phi~ phi~^T
    features, weight, bias, y = random_head(n=1, p=3, c=3, seed=4)
    phi = torch.cat([features[0], torch.ones(1, dtype=f64)])
    hessian = torch.autograd.functional.hessian(lambda flat: F.cross_entropy((flat.view(3, 4) @ phi)[None], y),
                                                torch.cat([weight, bias[:, None]], 1).reshape(-1))
    p = torch.softmax(weight @ features[0] + bias, -1)
    torch.testing.assert_close(hessian, torch.kron(torch.diag(p) - torch.outer(p, p), torch.outer(phi, phi)))


def test_probit_agrees_with_large_sample_mc_and_no_sample_predict_is_deterministic():
    features, weight, bias, _ = random_head(n=60, p=4, c=3, seed=8, scale=0.5)
    laplace = K.KFACLaplace.fit(features, weight, bias, prior_precision=1.0, temperature=1.5)
    probit = laplace.predict(features[:10], link="probit")
    mc = laplace.predict(features[:10], n_samples=20000, generator=seeded(9))
    assert torch.allclose(probit.sum(-1), torch.ones(10, dtype=f64))
    assert (probit - mc).abs().max() < 0.03  # the probit approximation is close, not exact: a few percent
    # exact check of the MC estimator: the same normals, drawn by hand
    directions = torch.randn(50, 3, generator=seeded(10), dtype=f64) @ torch.linalg.cholesky(laplace.factor("U")).T
    mean, scale = laplace.logit_distribution(features[:10])
    by_hand = torch.stack([torch.softmax((mean + scale.sqrt()[:, None] * d) / 1.5, -1) for d in directions]).mean(0)
    torch.testing.assert_close(laplace.predict(features[:10], 50, generator=seeded(10)), by_hand)


@pytest.mark.parametrize("n_classes", [3, 20])
def test_mc_softmax_mean_matches_a_loop_over_samples(n_classes):
    generator = seeded(21)
    mean = 3 * torch.randn(300, n_classes, generator=generator, dtype=f64)  # (N, c)
    scale = torch.rand(300, generator=generator, dtype=f64)  # (N,)
    directions = torch.randn(50, n_classes, generator=generator, dtype=f64)  # (S, c)
    by_hand = torch.stack([torch.log_softmax((mean + scale.sqrt()[:, None] * d) / 1.7, -1) for d in directions])
    torch.testing.assert_close(K.KFACLaplace.mc_softmax_mean(mean, scale, directions, 1.7), by_hand.exp().mean(0),
                               rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(K.KFACLaplace.mc_softmax_mean(mean, scale, directions, 1.7, log=True),
                               torch.logsumexp(by_hand, 0) - math.log(50), rtol=1e-12, atol=1e-12)


FINE_TEMPERATURES = torch.logspace(-2, 2, 801, dtype=f64)  # 0.01 .. 100, 1.2% apart
FINE_VARIANCES = torch.logspace(-4, 4, 33, dtype=f64).tolist()  # 1e-4 .. 1e4, quarter decades


def fine_grid_minimum(nll_at):
    """The smallest NLL on FINE_VARIANCES x FINE_TEMPERATURES; ``nll_at(sigma^2)``: the NLL (G,) on the temperatures."""
    return min(float(nll_at(v).min()) for v in FINE_VARIANCES)


def test_tune_laplace_and_its_greedy_ensemble_are_as_good_as_a_fine_grid_search_and_mie_by_hand():
    features, weight, bias, y = random_head(n=200, p=5, c=3, seed=13)
    y = (features @ weight.T + bias + 1.5 * torch.randn(200, 3, generator=seeded(14), dtype=f64)).argmax(-1)
    train_x, val, y_val = features[:100], features[100:], y[100:]
    laplace = K.KFACLaplace.fit(train_x, weight, bias)

    def predictive(v, temperatures=FINE_TEMPERATURES[:, None], normal=None, scale=1.0):  # (N, G, c), by hand
        return reference_predictive(val, *dense_posterior(train_x, scale * weight, bias, 1 / v), temperatures, normal)

    def nll(probs):
        return -probs[torch.arange(100), ..., y_val].log().mean(0)  # (G,)

    def chosen(tuned):
        return 1 / tuned.prior_precision, torch.tensor([[tuned.temperature]], dtype=f64)
    best = {}  # the fine grid's smallest NLL per link
    for link, n_samples in (("mc", 8), ("probit", None)):
        tuned = K.tune_laplace(laplace, val, y_val, n_samples or 1, link=link, generator=seeded(0))
        assert tuned.A is laplace.A  # a copy sharing the fitted factors
        normal = None if link == "probit" else torch.randn(8, 3, generator=seeded(0), dtype=f64)  # the search's draws
        best[link] = fine_grid_minimum(lambda v: nll(predictive(v, normal=normal)))
        assert float(nll(predictive(*chosen(tuned), normal=normal))) <= best[link] + 1e-4, link
    # the ensemble: exit 0 as good as the probit grid's best, then exit 1 in the mixture (p_0 + 3 p_1) / 4, exit 0 fixed
    tuned = K.tune_laplace_ensemble([laplace, K.KFACLaplace.fit(train_x, 0.5 * weight, bias)], [val, val], y_val,
                                    [1.0, 3.0], link="probit")
    fixed = predictive(*chosen(tuned[0]))  # (N, 1, c)
    assert float(nll(fixed)) <= best["probit"] + 1e-4
    mixture_nll = lambda *args: nll((fixed + 3 * predictive(*args, scale=0.5)) / 4)  # noqa: E731
    assert float(mixture_nll(*chosen(tuned[1]))) <= fine_grid_minimum(mixture_nll) + 1e-4
    # the model-internal ensemble by hand: exit k's mixture of exits <= k, weighted by their FLOPs
    probs = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[0.5, 0.5]]], dtype=f64)  # (K=3, N=1, c=2)
    expected = torch.tensor([[[1.0, 0.0]], [[0.25, 0.75]], [[3 / 8, 5 / 8]]], dtype=f64)
    torch.testing.assert_close(K.mie_ensemble(probs, torch.tensor([1.0, 3.0, 4.0])), expected)


def test_minimise_bracketed_and_tune_temperature_find_interior_end_and_global_minima():
    for objective, argmin in ((lambda x: (x - 0.3) ** 2, 0.3), (lambda x: abs(x - 1.7), 1.7), (lambda x: x, -4.0),
                              (lambda x: -x, 4.0),
                              (lambda x: min((x + 2.2) ** 2 + 0.5, (x - 2.6) ** 2), 2.6)):  # two basins: the lower
        x, value = K.minimise_bracketed(objective, [float(x) for x in range(-4, 5)], 1e-8)
        assert x == pytest.approx(argmin, abs=1e-7) and value == objective(x)
    g = seeded(41)
    logits = 4 * torch.randn(300, 3, generator=g, dtype=f64)
    y = (0.15 * logits + torch.randn(300, 3, generator=g, dtype=f64)).argmax(-1)  # overconfident logits: T > 3
    grid = torch.logspace(math.log10(1.0), math.log10(30.0), 20001, dtype=f64)  # 1 .. 30, 0.017% apart
    exp = torch.exp(logits[None] / grid[:, None, None])  # (G, N, c)
    best = float(grid[int((-torch.log(exp[:, torch.arange(300), y] / exp.sum(-1)).mean(1)).argmin())])  # by hand
    assert best > 3.0  # outside Meronen et al.'s grid 0.3 .. 3.0
    assert K.tune_temperature(logits.float(), y) == pytest.approx(best, rel=1e-3)
    assert K.tune_temperature(logits, y) == pytest.approx(best, rel=1e-3)


def test_budget_thresholds_and_early_exit_match_an_explicit_walk_with_ties_beyond_the_quota():
    confidences, level = torch.rand(3, 200, generator=seeded(16), dtype=f64), 0.7
    thresholds = K.budget_thresholds(confidences, level)
    # explicit per-sample walk, as in MSDNet's dynamic evaluation: exit k takes its share of those still present
    shares = [level ** (k + 1) for k in range(3)]
    exited, expected = set(), []
    for k in range(2):
        remaining = sorted((float(confidences[k, i]) for i in range(200) if i not in exited), reverse=True)
        expected.append(remaining[math.floor(200 * shares[k] / sum(shares)) - 1])
        exited |= {i for i in range(200) if confidences[k, i] >= expected[-1]}
    torch.testing.assert_close(thresholds, torch.tensor(expected + [-math.inf], dtype=f64))
    probs = torch.stack([confidences, 1 - confidences], -1)  # (3, 200, 2); max = max(c, 1 - c)
    exit_index, exit_probs = K.early_exit(probs, thresholds)
    for i in range(200):
        first = next((k for k in range(3) if probs[k, i].max() >= thresholds[k]), 2)
        assert exit_index[i] == first and torch.equal(exit_probs[i], probs[first, i]), i
    # 800 of 1000 validation samples tied at confidence 1.0 at every exit; q = 0.5 asks exit 0 for 571 and
    # exit 1 for 285: exit 0 takes all 800 ties, exit 1 the 200 that remain (its threshold: the last of them)
    confidences = torch.cat([torch.ones(3, 800, dtype=f64), torch.rand(3, 200, generator=seeded(42), dtype=f64) * 0.9], 1)
    thresholds = K.budget_thresholds(confidences, 0.5)
    assert thresholds.tolist() == [1.0, float(confidences[1, 800:].min()), -math.inf]
    exited, counts = torch.zeros(1000, dtype=torch.bool), []  # an explicit walk: how many leave at each exit
    for k in range(3):
        leaves = ~exited & (confidences[k] >= thresholds[k])
        counts.append(int(leaves.sum()))
        exited |= leaves
    assert counts == [800, 200, 0]
    everything_tied = K.budget_thresholds(torch.ones(3, 50, dtype=f64), 0.5)
    assert everything_tied.tolist() == [1.0, math.inf, -math.inf]  # nothing left for exit 1: none exit there


# ── AVCS ────────────────────────────────────────────────────────────────────────────────────────────────────────────

def test_log_gamma_sampler_mean_tiny_concentrations_and_domain():
    concentration = torch.tensor([0.3, 1.0, 4.0, 20.0], dtype=f64)
    x = K.log_gamma_variates(concentration.repeat(20000, 1), seeded(17)).exp()
    torch.testing.assert_close(x.mean(0), concentration, rtol=0.03, atol=0)  # Gamma(k, 1): mean and variance k
    torch.testing.assert_close(x.var(0), concentration, rtol=0.08, atol=0)
    tiny = K.log_gamma_variates(torch.full((1000,), 1e-4, dtype=f64), seeded(18))
    assert torch.isfinite(tiny).all()  # a direct Gamma(1e-4) draw underflows to 0 far more often than not
    assert (tiny.exp() == 0).float().mean() > 0.5
    # outside the Gamma's domain: unchecked, a NaN would hang the rejection step and -0.5 give a meaningless number
    for bad in (0.0, -0.5, math.nan, math.inf):
        with pytest.raises(ValueError, match="finite and > 0"):
            K.log_gamma_variates(torch.tensor([1.0, bad], dtype=f64), seeded(21))


def test_avcs_sets_match_an_explicit_loop(monkeypatch):
    logits = 3 * torch.randn(3, 8, 5, generator=seeded(19), dtype=f64)
    thresholds = torch.tensor([0.5, 1.0, 0.2], dtype=f64)
    # the Gamma variates come from numpy (the sampler is tested on its own): the loop below shares no code
    # with the module's ratio, support and set construction
    log_gamma = torch.from_numpy(np.log(np.random.default_rng(20).gamma(np.abs(logits.numpy()) + 0.1)))
    monkeypatch.setattr(K, "log_gamma_variates", lambda concentration, generator: log_gamma)
    sets = K.avcs_sets(logits, thresholds, alpha=0.1, intersect=False)
    intersected = K.avcs_sets(logits, thresholds, alpha=0.1, intersect=True)
    support = (logits >= thresholds[:, None, None]) & (logits > 0)
    for i in range(8):
        log_R = torch.zeros(5, dtype=f64)
        for t in range(3):
            a = torch.where(support[t, i], logits[t, i], torch.zeros(5, dtype=f64))
            gammas = torch.where(support[t, i], log_gamma[t, i].exp(), torch.zeros(5, dtype=f64))
            ratio = torch.log(a / a.sum()) - torch.log(gammas / gammas.sum())  # log(a_k / sum a) - log(pi_k)
            log_R = torch.where(a > 0, log_R + ratio, math.inf)  # a label outside the support is out for good
            assert torch.equal(sets[t, i], log_R <= math.log(1 / 0.1)), (t, i)
            assert torch.equal(intersected[t, i], sets[:t + 1, i].all(0)), (t, i)
    assert 0 < sets.sum() < sets.numel()  # labels both in and out of the sets


def test_set_metrics_hand_worked_and_nestedness_without_intersection_matches_an_explicit_loop():
    sets = torch.tensor([[[1, 1, 0], [0, 0, 0]], [[1, 0, 1], [0, 1, 0]]], dtype=torch.bool)  # (K=2, N=2, c=3)
    metrics = K.set_metrics(sets, torch.tensor([0, 1]))
    torch.testing.assert_close(metrics["size"], torch.tensor([1.0, 1.5], dtype=f64))
    torch.testing.assert_close(metrics["coverage"], torch.tensor([0.5, 1.0], dtype=f64))
    # exit 2: input 0 keeps {0} of {0, 2} -> 1/2; input 1: intersection empty, set not -> 0
    torch.testing.assert_close(metrics["nestedness"], torch.tensor([1.0, 0.25], dtype=f64))
    g = seeded(21)
    logits = 2 * torch.randn(4, 300, 10, generator=g, dtype=f64)
    sets = K.avcs_sets(logits, torch.ones(4, dtype=f64), alpha=0.05, intersect=False, generator=seeded(22))
    nestedness = K.set_metrics(sets, torch.randint(0, 10, (300,), generator=g))["nestedness"]
    members = [[{k for k in range(10) if sets[t, i, k]} for i in range(300)] for t in range(4)]  # [t][i]: a set
    expected = []
    for t in range(4):  # per input |common to exits 0..t| / |current|, 1 for an empty current set
        common = [set.intersection(*(members[s][i] for s in range(t + 1))) for i in range(300)]
        expected.append(sum(len(c) / len(m) if m else 1.0 for c, m in zip(common, members[t])) / 300)
    torch.testing.assert_close(nestedness, torch.tensor(expected, dtype=f64))
    assert sets.sum(-1).min() < sets.sum(-1).max()  # sets of several sizes: |common| / |current| is exercised
    below = K.avcs_sets(-torch.rand(2, 5, 3, dtype=f64), torch.ones(2), generator=seeded(0))
    assert not below.any()  # every logit below the threshold: empty support, empty set


def test_tune_avcs_thresholds_and_offsets_reach_coverage_on_their_data_and_bad_input_is_refused():
    g, alpha = seeded(23), 0.1
    y = torch.randint(0, 10, (400,), generator=g)
    logits = torch.randn(3, 400, 10, generator=g, dtype=f64) * 1.5
    logits[:, torch.arange(400), y] += torch.tensor([4.0, 6.0, 8.0], dtype=f64)[:, None]
    thresholds = K.tune_avcs(logits, y, alpha=alpha, generator=seeded(24))
    assert thresholds.shape == (3,) and (thresholds >= 1).all() and (thresholds > 1).any()

    def coverage(tau):
        return K.set_metrics(K.avcs_sets(logits, tau, alpha, generator=seeded(24)), y)["coverage"]
    assert (coverage(thresholds) >= 1 - alpha).all()
    for t in range(3):  # one more step at any exit loses coverage somewhere, or reaches the top logit
        raised = thresholds.clone()
        raised[t] += 0.5
        assert (coverage(raised) < 1 - alpha).any() or raised[t] >= logits.max()
    small = torch.randn(2, 4, 3)  # (K, N, c) with bad companions: one-line errors
    with pytest.raises(ValueError, match=r"thresholds \(K,\) expected"):
        K.avcs_sets(small, torch.ones(3))
    with pytest.raises(ValueError, match="y"):
        K.tune_avcs(small, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="step must be > 0"):  # a walk that would never end
        K.tune_avcs(small, torch.zeros(4, dtype=torch.long), step=0.0)
    g = seeded(60)  # offsets: where no thresholds can reach coverage
    y = torch.randint(0, 6, (300,), generator=g)
    logits = torch.randn(2, 300, 6, generator=g, dtype=f64)  # labels often below 0: outside the tau >= 1 support
    logits[:, torch.arange(300), y] += torch.tensor([0.5, 1.5], dtype=f64)[:, None]
    assert ((logits[:, torch.arange(300), y] >= 1).double().mean(-1) < 1 - alpha).all()  # no tau >= 1 reaches it
    offsets = K.tune_avcs(logits, y, alpha, "offset", generator=seeded(61))
    sets = K.avcs_sets(logits + offsets[:, None, None], torch.ones(2, dtype=f64), alpha, generator=seeded(61))
    assert (K.set_metrics(sets, y)["coverage"] >= 1 - alpha).all() and (offsets > 0).all()


def test_conformal_sets_apply_the_quantile_rule_and_cover_exchangeable_data():
    # hand case: calibration scores 1 - p(y) = 0.1, 0.2, ..., 0.9 (n = 9); alpha = 0.2 -> rank ceil(10 * 0.8) = 8: 0.8
    p_label = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1], dtype=f64)
    probs_val, y_val = torch.stack([p_label, 1 - p_label], -1)[None], torch.zeros(9, dtype=torch.long)  # label 0
    test = torch.tensor([[[0.25, 0.75], [0.15, 0.85], [0.5, 0.5]]], dtype=f64)  # 1 - p: 0.75/0.25, 0.85/0.15, 0.5
    assert K.conformal_sets(probs_val, y_val, test, 0.2)[0].tolist() == [[True, True], [False, True], [True, True]]
    assert K.conformal_sets(probs_val, y_val, test, 0.05).all()  # rank 10 > n: every label
    # exchangeable data: calibration and test drawn alike; coverage >= 1 - alpha within binomial noise per exit
    g, alpha, n = seeded(62), 0.1, 4000
    logits = torch.randn(2, 2 * n, 5, generator=g, dtype=f64) * torch.tensor([1.0, 3.0], dtype=f64)[:, None, None]
    probs = torch.softmax(logits, -1)  # (K, 2n, c): the model's predictive
    y = torch.multinomial(torch.softmax(0.5 * logits[1], -1), 1, generator=g)[:, 0]  # labels from another model
    sets = K.conformal_sets(probs[:, :n], y[:n], probs[:, n:], alpha)
    assert (K.set_metrics(sets, y[n:])["coverage"] >= 1 - alpha - 3 * math.sqrt(alpha * (1 - alpha) / n)).all()
    nested = K.conformal_sets(probs[:, :n], y[:n], probs[:, n:], alpha, intersect=True)
    assert torch.equal(nested[0], sets[0]) and torch.equal(nested[1], sets[0] & sets[1])


def test_auroc_equals_a_pairwise_count_with_ties_counted_half():
    g = seeded(63)
    scores_in = torch.randint(0, 6, (40,), generator=g).double()  # few values: many ties
    scores_out = torch.randint(0, 4, (30,), generator=g).double()
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a in scores_in.tolist() for b in scores_out.tolist()]
    assert K.auroc(scores_in, scores_out) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)
    assert K.auroc(torch.ones(3), torch.ones(4)) == 0.5 and K.auroc(torch.ones(2), torch.zeros(2)) == 1.0


def test_laplace_avcs_matches_explicit_ratio_product_and_excludes_far_labels_with_float32_features():
    features, weight, bias, _ = random_head(n=20, p=5, c=4, seed=25)  # few samples: a wide posterior
    temperatures, scales = (0.7, 1.0, 1.6), (0.5, 1.0, 2.0)
    laplaces = [K.KFACLaplace.fit(features, s * weight, bias, 1.0, t) for s, t in zip(scales, temperatures)]
    for intersect in (False, True):
        sets = K.laplace_avcs_sets(laplaces, [features] * 3, alpha=0.2, n_samples=10, intersect=intersect,
                                   generator=seeded(28))
        replay, log_R, running = seeded(28), torch.zeros(20, 4, dtype=f64), torch.ones(20, 4, dtype=torch.bool)
        for t, (s, temperature) in enumerate(zip(scales, temperatures)):
            weight_tilde, U, V = dense_posterior(features, s * weight, bias, 1.0)
            normal = torch.randn(10, 4, generator=replay, dtype=f64)  # the predictive's draws, then one per input
            draw_normal = torch.randn(20, 4, generator=replay, dtype=f64)
            predictive = reference_predictive(features, weight_tilde, U, V, temperature, normal)  # (20, 4)
            for i, phi in enumerate(torch.cat([features, torch.ones(20, 1, dtype=f64)], 1)):
                draw = weight_tilde @ phi + math.sqrt(float(phi @ V @ phi)) * torch.linalg.cholesky(U) @ draw_normal[i]
                log_R[i] += torch.log(predictive[i]) - torch.log_softmax(draw / temperature, -1)
            running &= log_R <= math.log(5.0)
            assert torch.equal(sets[t], running if intersect else log_R <= math.log(5.0)), (t, intersect)
        assert 0 < sets.sum() < sets.numel()
    # a logit gap of 130, a wide posterior: the far label's predictive, ~1e-40, is below float32; sets ignore the dtype
    weight = torch.tensor([[130.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    laplace = K.KFACLaplace.fit(0.05 * torch.randn(4, 3, generator=seeded(43)), weight, torch.zeros(2), 1e-2)
    x = torch.tensor([[1.0, 0.0, 0.0]]).repeat(500, 1)
    sets32 = K.laplace_avcs_sets([laplace], [x], 0.05, 20, generator=seeded(44))
    sets64 = K.laplace_avcs_sets([laplace], [x.double()], 0.05, 20, generator=seeded(44))
    assert torch.equal(sets32, sets64)
    assert 1 - sets64[0, :, 1].double().mean() > 0.5  # label 1 is excluded (a float32 numerator kept it always)


# ── Metrics ─────────────────────────────────────────────────────────────────────────────────────────────────────────

def test_group_and_worst_group_accuracy():
    pred, y = torch.tensor([0, 1, 1, 0, 1, 1]), torch.tensor([0, 1, 0, 0, 1, 0])
    groups = torch.tensor([0, 1, 2, 2, 3, 3])
    accuracies = K.group_accuracies(pred, y, groups, 5)
    torch.testing.assert_close(accuracies[:4], torch.tensor([1.0, 1.0, 0.5, 0.5], dtype=f64))
    assert math.isnan(accuracies[4])  # an empty group has no accuracy
    assert K.worst_group_accuracy(pred, y, groups, 5) == 0.5
    # a dataset whose training split has group counts 4, 3, 2, 1, 0: the adjusted average weighs test groups by them
    split = K.Split(torch.zeros(6, 3, 2, 2, dtype=torch.uint8), y, groups)
    train_split = K.Split(torch.zeros(10, 3, 2, 2, dtype=torch.uint8), torch.zeros(10).long(),
                          torch.tensor([0] * 4 + [1] * 3 + [2] * 2 + [3]))
    data = K.SpuriousDataset("waterbirds", train_split, split, split, 2, 5, list("abcde"), (0.5,) * 3, (0.5,) * 3,
                             "y", "place", "none")
    report = data.accuracy(pred, split)
    assert report["avg_acc"] == 4 / 6 and report["worst_group_acc"] == 0.5
    assert report["group_acc"] == [1.0, 1.0, 0.5, 0.5, None]
    assert report["adjusted_avg_acc"] == pytest.approx((4 + 3 + 2 * 0.5 + 0.5) / 10, abs=1e-15)
    data.name = "synth"
    assert "adjusted_avg_acc" not in data.accuracy(pred, split)


def test_ece_group_means_pearson_correlation_nlpd_and_top5_against_loops_and_by_hand():
    g = seeded(32)
    probs = torch.softmax(3 * torch.randn(500, 4, generator=g, dtype=f64), -1)
    probs[:20] = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=f64)  # confidence exactly 1.0 must be counted
    y = torch.randint(0, 4, (500,), generator=g)
    confidence, pred = probs.max(-1)
    edges, total = torch.linspace(0, 1, 16, dtype=f64), 0.0
    for b in range(15):
        in_bin = [i for i in range(500) if (edges[b] < confidence[i] <= edges[b + 1]) or (b == 0 and confidence[i] == 0)]
        if in_bin:
            accuracy = sum(float(pred[i] == y[i]) for i in in_bin) / len(in_bin)
            mean_confidence = sum(float(confidence[i]) for i in in_bin) / len(in_bin)
            total += len(in_bin) / 500 * abs(accuracy - mean_confidence)
    assert K.expected_calibration_error(probs, y) == pytest.approx(total, abs=1e-12)
    values, groups = torch.tensor([1.0, 2.0, 4.0, 8.0, 3.0], dtype=f64), torch.tensor([0, 0, 2, 2, 2])
    assert K.group_means(values, groups, 4) == [1.5, None, 5.0, None]  # an empty group has no mean
    a, b = torch.randn(50, generator=seeded(60), dtype=f64), torch.randn(50, generator=seeded(61), dtype=f64)
    expected = float(np.corrcoef(a.numpy(), (a + 0.5 * b).numpy())[0, 1])
    assert K.pearson_correlation(a, a + 0.5 * b) == pytest.approx(expected, rel=1e-12)
    assert K.pearson_correlation(a, torch.ones(50)) is None
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.0, 0.1, 0.9]], dtype=f64)  # a zero probability: clamped at 1e-12
    assert K.nlpd(probs, torch.tensor([1, 0])) == pytest.approx(-(math.log(0.3) + math.log(1e-12)) / 2)
    six = torch.tensor([[0.3, 0.25, 0.2, 0.1, 0.1, 0.05], [0.05, 0.1, 0.1, 0.2, 0.25, 0.3]], dtype=f64)
    # the label 5 is the 6th most probable class of the first input, the most probable of the second
    assert K.classification_metrics(six, torch.tensor([5, 5]), torch.tensor([0, 1]), 2)["top5"] == 0.5


# ── The mathematics as copyable units ───────────────────────────────────────────────────────────────────────────────
# Every public function and class of sections 1-5 of the module runs pasted, with the public units it names, into a
# file of only ``from __future__ import annotations`` and imports of math, numpy as np, torch, torch.nn as nn and F.

def module_units():
    """{name: (source, names of the module's units it uses)} for the top-level defs of sections 1-5."""
    source = Path(K.__file__).read_text()
    tree, lines = ast.parse(source), source.splitlines()
    networks = next(i for i, line in enumerate(lines) if line.startswith("#  6. Networks")) + 1
    module_names = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    module_names |= {target.id for node in tree.body if isinstance(node, ast.Assign) for target in node.targets
                     if isinstance(target, ast.Name)}
    units = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.lineno < networks:
            start = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
            used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} & module_names - {node.name}
            units[node.name] = ("\n".join(lines[start:node.end_lineno]), used)
    return units


def copied(name, units):
    """A namespace holding ``name`` and the units it needs, executed from their source alone."""
    namespace = {"math": math, "np": np, "torch": torch, "nn": torch.nn, "F": F}
    needed, queue = [], [name]
    while queue:
        unit = queue.pop()
        if unit not in needed:
            needed.append(unit)
            queue.extend(units[unit][1])
    for unit in sorted(needed, key=list(units).index):  # in the module's order: dependencies first
        exec(compile("from __future__ import annotations\n" + units[unit][0], f"<copy of {unit}>", "exec"), namespace)
    return type("Copy", (), {k: staticmethod(v) if callable(v) and not isinstance(v, type) else v
                             for k, v in namespace.items()})


def unit_examples():
    """name -> function(module or copy) -> a result to compare; every public unit of sections 1-5."""
    features, weight, bias, y = random_head(n=30, p=4, c=3, seed=40)
    logits = torch.randn(3, 8, 3, generator=seeded(41), dtype=f64) * 3  # (K, N, c)
    probs = torch.softmax(logits, -1)  # (K, N, c)
    groups = torch.arange(8) % 4

    def laplace(m):
        return m.KFACLaplace.fit(features, weight, bias, 2.0, 1.5)

    return {
        "kd_loss": lambda m: m.kd_loss(logits[0], logits[1], 2.0),
        "confidence_margin": lambda m: m.confidence_margin(probs[0]),
        "dedier_weights": lambda m: m.dedier_weights(probs[0], y[:8], 0.5, 2.0),
        "student_loss": lambda m: m.student_loss(logits[0], logits[1], y[:8], None, 0.5, 2.0),
        "group_dro_loss": lambda m: m.group_dro_loss(torch.rand(8, generator=seeded(44), dtype=f64), groups,
                                                     torch.full((4,), 0.25, dtype=f64), 0.1),
        "early_exit_loss": lambda m: m.early_exit_loss(list(logits), y[:8]),
        "KFACLaplace": lambda m: laplace(m).predict(features[:5], 20, generator=seeded(45)),
        "minimise_bracketed": lambda m: m.minimise_bracketed(lambda x: (x - 0.3) ** 2, [-1.0, 0.0, 1.0, 2.0]),
        "tune_temperature": lambda m: m.tune_temperature(logits[0], y[:8]),
        "tune_laplace": lambda m: m.tune_laplace(laplace(m), features, y, n_samples=10, generator=seeded(46)).temperature,
        "tune_laplace_marglik": lambda m: m.tune_laplace_marglik(laplace(m)).prior_precision,
        "cross_fitted_laplace_predict": lambda m: m.cross_fitted_laplace_predict(laplace(m), features, 3, 10, seeded(47)),
        "mie_ensemble": lambda m: m.mie_ensemble(probs, torch.tensor([1.0, 2.0, 3.0], dtype=f64)),
        "tune_laplace_ensemble": lambda m: [t.prior_precision for t in m.tune_laplace_ensemble(
            [laplace(m)] * 2, [features] * 2, y, [1.0, 2.0], n_samples=10, generator=seeded(48))],
        "budget_thresholds": lambda m: m.budget_thresholds(probs.max(-1).values, 0.5),
        "early_exit": lambda m: m.early_exit(probs, torch.tensor([0.9, 0.8, 0.0], dtype=f64)),
        "log_gamma_variates": lambda m: m.log_gamma_variates(torch.rand(10, generator=seeded(49), dtype=f64), seeded(50)),
        "nested_sets": lambda m: m.nested_sets(logits, 0.1),
        "dirichlet_log_ratios": lambda m: m.dirichlet_log_ratios(logits, torch.ones(3), seeded(51)),
        "avcs_sets": lambda m: m.avcs_sets(logits, torch.ones(3), 0.1, generator=seeded(52)),
        "tune_avcs": lambda m: m.tune_avcs(logits, y[:8], 0.2, generator=seeded(53)),
        "laplace_avcs_sets": lambda m: m.laplace_avcs_sets([laplace(m)] * 2, [features] * 2, 0.1, 10,
                                                           generator=seeded(54)),
        "conformal_sets": lambda m: m.conformal_sets(probs, y[:8], probs, 0.2, True),
        "set_metrics": lambda m: m.set_metrics(logits > 0, y[:8]),
        "group_accuracies": lambda m: m.group_accuracies(probs[0].argmax(-1), y[:8], groups, 4),
        "worst_group_accuracy": lambda m: m.worst_group_accuracy(probs[0].argmax(-1), y[:8], groups, 4),
        "reliability_bins": lambda m: m.reliability_bins(probs[0], y[:8], 5),
        "expected_calibration_error": lambda m: m.expected_calibration_error(probs[0], y[:8]),
        "nlpd": lambda m: m.nlpd(probs[0], y[:8]),
        "auroc": lambda m: torch.tensor(m.auroc(probs[0, :, 0], probs[1, :, 0])),
    }


def test_the_module_defines_every_name_before_its_first_use_and_every_unit_runs_copied_on_its_own():
    tree = ast.parse(Path(K.__file__).read_text())
    position = {}
    for index, node in enumerate(tree.body):
        targets = [node] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            [t for n in (node.targets if isinstance(node, ast.Assign) else []) for t in ast.walk(n)]
        for target in targets:
            name = getattr(target, "name", getattr(target, "id", None))
            if name is not None:
                position[name] = index
    late = [(getattr(node, "name", "?"), name) for index, node in enumerate(tree.body)
            for name in {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} if position.get(name, -1) > index]
    assert not late
    units, examples = module_units(), unit_examples()
    assert set(units) == set(examples), "an example for every unit of sections 1-5"
    assert not [name for name in units if name.startswith("_")], "no private helpers in sections 1-5"
    for name, (_, used) in units.items():  # the docstring says what to copy along
        assert all(f"{other}`" in getattr(K, name).__doc__ for other in used), (name, used)
    for name, example in examples.items():
        expected, got = example(K), example(copied(name, units))
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


# ── Networks ────────────────────────────────────────────────────────────────────────────────────────────────────────

def conv_bn_keys(conv: str, bn: str) -> list[str]:
    return [f"{conv}.weight"] + [f"{bn}.{key}"
                                 for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


# torchvision resnet18().state_dict().keys(), in order (122 keys): the stem, four layers of two BasicBlocks (a
# downsample on the first block of layers 2-4), the classifier
RESNET18_KEYS = conv_bn_keys("conv1", "bn1") + [
    key for layer in range(1, 5) for block in range(2) for prefix in [f"layer{layer}.{block}"]
    for key in conv_bn_keys(f"{prefix}.conv1", f"{prefix}.bn1") + conv_bn_keys(f"{prefix}.conv2", f"{prefix}.bn2")
    + (conv_bn_keys(f"{prefix}.downsample.0", f"{prefix}.downsample.1") if layer > 1 and block == 0 else [])
] + ["fc.weight", "fc.bias"]


@pytest.mark.parametrize("arch,size", [("cnn", 32), ("resnet18-cifar", 32), ("resnet18", 64), ("resnet50", 64)])
def test_forward_features_and_heads_reproduce_forward(arch, size):
    torch.manual_seed(0)
    model = K.build_model(arch, 5, width=8, input_size=size).double().eval()
    x = torch.randn(2, 3, size, size, dtype=f64)
    logits, features = model(x), model.forward_features(x)
    assert len(logits) == len(features) == len(model.heads) == len(model.exit_flops)
    for head, f, z in zip(model.heads, features, logits):
        assert f.shape == (2, head.linear.in_features)
        torch.testing.assert_close(head.linear(f), z)
    assert all(a < b for a, b in zip(model.exit_flops, model.exit_flops[1:]))
    assert model.heads[-1].linear is model.backbone.fc  # the last exit is the network's own classifier
    torch.testing.assert_close(model.forward_features(x, exits=[0])[0], features[0])


@pytest.mark.parametrize("arch", ["cnn", "resnet18-cifar"])
def test_pass_and_exit_flops_count_what_a_pass_over_some_exits_runs(arch):
    model = K.build_model(arch, 3, width=4, input_size=16).eval()
    counted = []  # multiply-adds of every conv and linear that actually runs, by hooks on an explicit pass

    def count(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            counted.append(output[0].numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1])
        else:
            counted.append(module.in_features * module.out_features)
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.register_forward_hook(count)
    prefixes = [list(range(k + 1)) for k in range(len(model.heads))]  # an exit's anytime cost: it and those before
    for exits in ([1], [-1], [0, -1], [-1, 0], [1, 2], None, *prefixes):
        counted.clear()
        with torch.no_grad():
            features = model.forward_features(torch.zeros(1, 3, 16, 16), exits)
            for k, f in zip(range(len(model.heads)) if exits is None else exits, features):
                model.heads[k].linear(f)
        assert model.pass_flops(exits) == sum(counted), exits
        if exits in prefixes:
            assert model.exit_flops[len(exits) - 1] == sum(counted), exits
    if arch == "cnn":  # by hand, width 4 at 16x16: stage 1 a stride-2 conv 3->4 and a conv 4->4 (8x8 outputs); head 1
        assert model.exit_flops[0] == (8 * 8 * 4 * 3 * 9 + 8 * 8 * 4 * 4 * 9) + (2 * 8 * 8 * 4 * 4 * 9 + 4 * 3)


def test_predict_split_runs_heads_in_float32_under_cpu_bf16_autocast():
    torch.manual_seed(3)
    model, data = K.build_model("cnn", 2, width=8).eval(), K.make_synth(32, 64, 8, seed=1)

    def predict(**options):
        return K.predict_split(model, data.val, data.mean, data.std, torch.device("cpu"), amp=True, **options)
    logits, features = predict()
    assert logits.dtype == features[0].dtype == torch.float32
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            stage = model.backbone.stages[0](K.prepare_batch(data.val.images, data.mean, data.std))  # bf16 backbone
            bf16_logits = model.heads[0](stage).float()  # what a bf16 head would give
        assert stage.dtype == torch.bfloat16
        head = copy.deepcopy(model.heads[0]).double()
        expected_features = head.features(stage.double())  # (N, p): float64 head on the same stage output
        expected_logits = head.linear(expected_features)
    torch.testing.assert_close(features[0].double(), expected_features, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits[0].double(), expected_logits, rtol=1e-4, atol=1e-5)
    relative = (bf16_logits.double() - expected_logits).abs().max() / expected_logits.abs().max()
    assert relative > 1e-3  # a bf16 head is visibly off (~3 significant digits); the float32 one is not
    # float32_heads=False (train.py's per-epoch weight passes): the heads' convolutions in bf16, their features
    # and the linear layers' logits returned in float32, within bf16's rounding of the float64 reference
    logits_bf16, features_bf16 = predict(float32_heads=False)
    assert logits_bf16.dtype == features_bf16[0].dtype == torch.float32
    torch.testing.assert_close(features_bf16[0].double(), expected_features, rtol=0.05, atol=0.05)
    torch.testing.assert_close(logits_bf16[0], head.linear.float()(features_bf16[0]), rtol=1e-5, atol=1e-6)
    assert not torch.equal(features_bf16[0], features[0])
    # two exits in one pass (train.py's validation pass), in the order asked for: each bit for bit as alone
    (both_logits, both_features), (last_logits, last_features) = predict(exits=[2, 0]), predict(exits=[2])
    assert torch.equal(both_logits[0], last_logits[0]) and torch.equal(both_features[0], last_features[0])
    assert torch.equal(both_logits[1], logits[0]) and torch.equal(both_features[1], features[0])


def test_build_model_matches_torchvision_flops_and_names_reloads_weights_and_rejects_bad_requests(tmp_path):
    for arch, published_gmacs in (("resnet18", 1.814), ("resnet50", 4.089)):
        model = K.build_model(arch, 1000)  # 224 x 224 inputs
        readouts = 0  # our early heads, counted by hand: two 3x3 convs of width min(2C, 128), then a linear
        for k, channels in enumerate(model.backbone.stage_channels[:-1]):
            side, width = 56 // 2 ** k, min(2 * channels, 128)
            readouts += side * side * width * 9 * (channels + width) + width * 1000
        assert abs((model.exit_flops[-1] - readouts) / 1e9 - published_gmacs) < 5e-4, arch  # torchvision's GMACs
    model = K.build_model("resnet18", 10)
    assert list(model.backbone.state_dict().keys()) == RESNET18_KEYS
    torch.save(model.backbone.state_dict(), tmp_path / "weights.pth")
    reloaded = K.build_model("resnet18", 10, pretrained=tmp_path / "weights.pth")
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(reloaded.backbone.state_dict()[key], value), key
    other = K.build_model("resnet18", 3, pretrained=tmp_path / "weights.pth")  # another class count: new fc
    assert other.backbone.fc.weight.shape == (3, 512)
    torch.testing.assert_close(other.backbone.layer1[0].conv1.weight, model.backbone.layer1[0].conv1.weight)
    broken = dict(model.backbone.state_dict())
    broken["layer9.weight"] = broken.pop("layer1.0.conv1.weight")
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="layer1.0.conv1.weight"):
        K.build_model("resnet18", 10, pretrained=tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="unknown arch 'vgg'"):
        K.build_model("vgg", 10)
    with pytest.raises(ValueError, match="no pretrained"):
        K.build_model("cnn", 10, pretrained=True)


def test_one_training_step_under_cpu_bf16_autocast_and_detached_exits():
    torch.manual_seed(2)
    model, data = K.build_model("cnn", 2, width=4), K.make_synth(32, 8, 8, seed=0)
    x = K.prepare_batch(data.train.images[:16], data.mean, data.std, "flip", seeded(0))
    with K.autocast(torch.device("cpu"), True):
        logits = model(x)
        loss = K.student_loss(logits[-1], torch.randn(16, 2), data.train.labels[:16], torch.ones(16), 0.5, 3.0)
    assert logits[-1].dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(model.backbone.fc.weight.grad).all()
    detached, x = K.build_model("cnn", 3, width=4), torch.randn(4, 3, 32, 32)
    detached(x)[0].sum().backward()  # a loss on the readout only: the detached exit trains its head alone
    assert all(p.grad is None for p in detached.backbone.parameters())
    assert all(p.grad is not None for p in detached.heads[0].parameters())
    joint = K.build_model("cnn", 3, width=4, detach_exits=False)
    joint(x)[0].sum().backward()
    assert joint.backbone.stages[0][0].weight.grad is not None


# ── Data ────────────────────────────────────────────────────────────────────────────────────────────────────────────

def test_synth_is_deterministic_in_waterbirds_and_multi_class_proportions_with_refusals_and_far_inputs():
    a, b = K.make_synth(480, 120, 240, seed=3), K.make_synth(480, 120, 240, seed=3)
    assert torch.equal(a.train.images, b.train.images) and a.train.images.dtype == torch.uint8
    assert a.train.images.shape == (480, 3, 32, 32)
    counts = torch.bincount(a.train.groups, minlength=4).tolist()
    assert counts[0] > counts[3] > counts[1] > counts[2] >= 1  # 3498 : 1057 : 184 : 56
    test_counts = torch.bincount(a.test.groups, minlength=4).tolist()  # backgrounds balanced in each class
    assert abs(test_counts[0] - test_counts[1]) <= 1 and abs(test_counts[2] - test_counts[3]) <= 1
    with pytest.raises(ValueError, match="n_train=45 .* the next size that can is n_train=50"):
        K.make_synth(n_train=45, n_val=40, n_test=40, n_classes=10)  # it would cut off a group
    assert len(K.make_synth(n_train=50, n_val=40, n_test=40, n_classes=10).train.labels.unique()) == 10
    with pytest.raises(ValueError, match="2 to 10 classes"):
        K.make_synth(n_train=100, n_val=50, n_test=50, n_classes=11)
    far = K.make_synth_far_inputs(12, 32, n_classes=8, seed=0)
    assert set(far) == {"unseen shapes", "unseen colours"} and far["unseen shapes"].shape == (12, 3, 32, 32)
    assert set(K.make_synth_far_inputs(4, 32, n_classes=10)) == {"unseen colours"}  # every shape is a class
    assert set(K.make_synth_far_inputs(4, 32, n_classes=2)) == {"unseen shapes"}
    data = K.make_synth(n_train=2000, n_val=400, n_test=800, seed=2, n_classes=10)
    assert (data.n_classes, data.n_groups) == (10, 20)
    assert data.group_names[:3] == ["disk/own", "disk/other", "triangle/own"]
    for split in (a.train, a.test, data.train, data.val, data.test):  # 2 classes: g = 2 y + place
        assert torch.equal(split.groups // 2, split.labels)  # more: g = 2 y + [background is another class's]
    train_counts = torch.bincount(data.train.groups, minlength=20).view(10, 2)  # (class, own / other)
    assert torch.all((train_counts[:, 0].double() / train_counts.sum(1) - 0.9).abs() < 0.01)  # 90% on its own
    assert train_counts.sum(1).max() - train_counts.sum(1).min() <= 2  # classes balanced
    val_counts = torch.bincount(data.val.groups, minlength=20)
    assert val_counts.max() - val_counts.min() <= 1  # backgrounds balanced in val
    # the background's colour (the median pixel: the shape covers under a quarter of the image) is nearest to the
    # class's own colour of the wheel exactly in the "own" groups
    hues = torch.arange(10)[:, None] / 10 + torch.tensor([0.0, 1 / 3, 2 / 3])  # (10, 3)
    wheel = 0.45 + 0.25 * torch.cos(2 * math.pi * hues)  # (10, 3)
    median = data.train.images.flatten(2).float().median(-1).values / 255  # (N, 3)
    nearest = torch.cdist(median, wheel).argmin(-1)  # (N,)
    assert torch.equal(nearest == data.train.labels, data.train.groups % 2 == 0)
    # the class is the shape: at one centre and size no two shapes (nor one and another's mirror image, which the
    # flip augmentation makes) agree on more than 90% of their union
    coords = (torch.arange(64, dtype=torch.float32) + 0.5) / 64
    half = torch.full((1, 1, 1), 0.2)
    masks = K._shape_masks(coords[None, :, None], coords[None, None, :], half + 0.3, half + 0.3, half, 10)[:, 0]
    for a, b in itertools.product(range(10), range(10)):
        for other in ([masks[b]] if a == b else [masks[b], masks[b].flip(-1)]):
            overlap = (masks[a] & other).sum() / (masks[a] | other).sum()
            assert (overlap > 0.99) if a == b else (overlap < 0.9), (K.SYNTH_SHAPES[a], K.SYNTH_SHAPES[b], overlap)


def test_synth_shortcut_is_learned_by_short_erm():
    torch.manual_seed(0)
    data, model, generator = K.make_synth(1200, 200, 800, seed=0), K.build_model("cnn", 2, width=8), seeded(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        for index in torch.randperm(1200, generator=generator).split(64):
            x = K.prepare_batch(data.train.images[index], data.mean, data.std, "flip", generator)
            optimizer.zero_grad()
            F.cross_entropy(model(x)[-1], data.train.labels[index]).backward()
            optimizer.step()
    logits, _ = K.predict_split(model, data.test, data.mean, data.std, torch.device("cpu"), exits=[-1])
    accuracies = K.group_accuracies(logits[0].argmax(-1), data.test.labels, data.test.groups, 4)
    # the majority groups (background agrees with the class) are solved, a minority group is not
    assert accuracies[0] > 0.9 and accuracies[3] > 0.9 and min(accuracies[1], accuracies[2]) < 0.5


def test_augmentations_match_explicit_crops():
    images = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    out = K.pad_crop_flip(images, seeded(4), padding=2)
    replay = seeded(4)  # the module's draws, in its order: crop offsets, then flips
    offsets, flips = torch.randint(0, 5, (2, 2), generator=replay), torch.rand(2, generator=replay) < 0.5
    padded = F.pad(images, (2, 2, 2, 2))
    for i in range(2):
        r, c = offsets[i].tolist()
        # a flip mirrors the crop window too: column j of the output reads padded column c + (4 - j)
        crop = padded[i].flip(-1)[:, r:r + 5, 4 - c:9 - c] if flips[i] else padded[i, :, r:r + 5, c:c + 5]
        assert torch.equal(out[i], crop), i
    images = torch.rand(4, 3, 8, 8)  # a random resized crop of the full area: the image or its mirror
    out = K.random_resized_crop_flip(images, seeded(5), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    for i in range(4):
        assert torch.allclose(out[i], images[i], atol=1e-5) or torch.allclose(out[i], images[i].flip(-1), atol=1e-5)


COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (40, 220, 220), (220, 40, 220)]


def write_jpeg(path: Path, colour, size=(40, 30)):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, tuple(colour)).save(path, quality=95)


def assert_solid_colours(split, rows):
    """Image k of ``split`` is row rows[k]'s solid colour: it survives resize, crop and JPEG to within a few levels."""
    for image, i in zip(split.images, rows):
        assert (image.float().mean((1, 2)) - torch.tensor(COLOURS[i % 6]).float()).abs().max() < 6, i


def make_waterbirds(root: Path, n: int = 12) -> list[dict]:
    rows = []
    for i in range(n):
        y, place, split = i % 2, (i // 2) % 2, [0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2][i]
        name = f"{i:03d}.Bird_{y}/img_{i}.jpg"
        write_jpeg(root / name, COLOURS[i % 6])
        rows.append({"img_id": i, "img_filename": name, "y": y, "split": split, "place": place,
                     "place_filename": f"/x/{i}.jpg"})
    with open(root / "metadata.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def test_waterbirds_loader_reads_the_real_layout_and_caches(tmp_path, monkeypatch):
    rows = make_waterbirds(tmp_path / "wb")
    data = K.load_dataset("waterbirds", tmp_path / "wb", image_size=16, cache_dir=tmp_path / "cache")
    assert data.train.images.shape == (6, 3, 16, 16) and data.train.images.dtype == torch.uint8
    for split, ids in ((data.train, range(0, 6)), (data.val, range(6, 9)), (data.test, range(9, 12))):
        assert split.labels.tolist() == [rows[i]["y"] for i in ids]
        assert split.groups.tolist() == [2 * rows[i]["y"] + rows[i]["place"] for i in ids]
        assert_solid_colours(split, ids)
    assert not any((tmp_path / "wb").rglob("*.u8"))  # the cache never goes into the data folder
    monkeypatch.setattr(K, "_decode_image", lambda *a: pytest.fail("second load decoded an image"))
    again = K.load_dataset("waterbirds", tmp_path / "wb", image_size=16, cache_dir=tmp_path / "cache")
    assert torch.equal(again.test.images, data.test.images)


def test_waterbirds_loader_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata.csv"):
        K.load_dataset("waterbirds", tmp_path, cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="looked for .*nowhere/metadata.csv"):
        K.load_dataset("waterbirds", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown dataset 'birds'"):
        K.load_dataset("birds", tmp_path)
    image = tmp_path / "wb" / make_waterbirds(tmp_path / "wb")[3]["img_filename"]
    image.unlink()
    with pytest.raises(FileNotFoundError, match="img_3.jpg"):
        K.load_dataset("waterbirds", tmp_path / "wb", image_size=16, cache_dir=tmp_path / "cache")
    image.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="cannot decode image .*img_3.jpg"):
        K.load_dataset("waterbirds", tmp_path / "wb", image_size=16, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())  # a failed build leaves nothing that looks like a cache
    text = (tmp_path / "wb" / "metadata.csv").read_text().replace("place,", "location,")
    (tmp_path / "wb" / "metadata.csv").write_text(text)
    with pytest.raises(ValueError, match="missing column.*place"):
        K.load_dataset("waterbirds", tmp_path / "wb", image_size=16, cache_dir=tmp_path / "cache")


def test_data_root_defaults_and_the_distributions_folder_names(tmp_path, monkeypatch):
    make_waterbirds(tmp_path / "store" / "waterbirds" / "waterbird_complete95_forest2water2")
    monkeypatch.setenv("KDLAPLACE_DATA", str(tmp_path / "store"))
    data = K.load_dataset("waterbirds", image_size=16, cache_dir=tmp_path / "cache")  # $KDLAPLACE_DATA/waterbirds
    assert (len(data.train), len(data.val), len(data.test)) == (6, 3, 3)
    monkeypatch.delenv("KDLAPLACE_DATA")
    monkeypatch.chdir(tmp_path)
    make_waterbirds(tmp_path / "data" / "waterbirds" / "waterbirds_v1.0")  # WILDS' folder under ./data
    assert K.resolve_data_root("waterbirds") == Path("data/waterbirds/waterbirds_v1.0")
    with pytest.raises(FileNotFoundError) as error:
        K.load_dataset("cifar100")
    for place in ("data/cifar100/meta", "data/cifar100/cifar-100-python/meta", "CIFAR-100 python version",
                  "$KDLAPLACE_DATA"):
        assert place in str(error.value), place


@pytest.mark.parametrize("kaggle", [False, True])
def test_celeba_loader_reads_both_distributions(tmp_path, kaggle):
    # nine images: the official text tables (space-separated, a count line) or Kaggle's CSVs and nested folder
    root, names = tmp_path / "celeba", [f"{i + 1:06d}.jpg" for i in range(9)]
    blond, male, split = [1, 0, 0, 1, 1, 0, 0, 1, 0], [0, 1, 0, 1, 0, 1, 0, 0, 1], [0, 0, 0, 0, 1, 1, 2, 2, 2]
    for i, name in enumerate(names):
        write_jpeg(root / ("img_align_celeba/img_align_celeba" if kaggle else "img_align_celeba") / name,
                   COLOURS[i % 6], size=(30, 36))
    attributes = ["5_o_Clock_Shadow", "Blond_Hair", "Male", "Young"]
    signs = [(-1, 2 * blond[i] - 1, 2 * male[i] - 1, 1) for i in range(9)]
    if kaggle:
        (root / "list_attr_celeba.csv").write_text("image_id," + ",".join(attributes) + "\n" + "".join(
            f"{name},{','.join(map(str, s))}\n" for name, s in zip(names, signs)))
        (root / "list_eval_partition.csv").write_text("image_id,partition\n" + "".join(
            f"{n},{s}\n" for n, s in zip(names, split)))
    else:
        (root / "list_attr_celeba.txt").write_text(f"9\n{' '.join(attributes)}\n" + "".join(
            f"{name} {s[0]}  {s[1]} {s[2]}  {s[3]}\n" for name, s in zip(names, signs)))  # padded like the real file
        (root / "list_eval_partition.txt").write_text("".join(f"{n} {s}\n" for n, s in zip(names, split)))
    data = K.load_dataset("celeba", root, image_size=8, cache_dir=tmp_path / "cache")
    for part, split_data in enumerate((data.train, data.val, data.test)):
        rows = [i for i in range(9) if split[i] == part]
        assert split_data.labels.tolist() == [blond[i] for i in rows]
        assert split_data.groups.tolist() == [2 * blond[i] + male[i] for i in rows]
        assert_solid_colours(split_data, rows)
    (root / ("list_attr_celeba.csv" if kaggle else "list_attr_celeba.txt")).unlink()
    with pytest.raises(FileNotFoundError, match="list_attr_celeba"):
        K.load_dataset("celeba", root, cache_dir=tmp_path / "cache")


def test_cifar100_loader_reads_the_pickles(tmp_path):
    folder, rng, batches = tmp_path / "cifar-100-python", np.random.default_rng(0), {}
    folder.mkdir()
    for name, n in (("train", 20), ("test", 6)):
        batches[name] = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "fine_labels": rng.integers(0, 100, n).tolist(), "coarse_labels": rng.integers(0, 20, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(batches[name]))
    (folder / "meta").write_bytes(pickle.dumps({"coarse_label_names": [f"super{i}" for i in range(20)]}))
    data = K.load_dataset("cifar100", tmp_path, val_size=5, seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (15, 5, 6)
    assert data.n_classes == 100 and data.n_groups == 20 and data.group_names[3] == "super3"
    raw = batches["test"]["data"][2]
    assert data.test.images[2, 0, 0, :].tolist() == raw[:32].tolist()  # R plane first, row-major
    assert data.test.images[2, 2, 31, 31] == raw[3071]
    assert data.test.labels.tolist() == batches["test"]["fine_labels"]
    everything = torch.cat([data.train.labels, data.val.labels]).sort().values
    assert everything.tolist() == sorted(batches["train"]["fine_labels"])
    (folder / "test").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a CIFAR-100 pickle"):
        K.load_dataset("cifar100", tmp_path)


# ── train.py, eval.py and bench.py end to end ───────────────────────────────────────────────────────────────────────

TINY = ["--synth-n-train", "64", "--epochs", "2", "--teacher-epochs", "1", "--width", "4", "--device", "cpu"]


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """One tiny synth run per weighting (the first trains the teacher, the others reuse it)."""
    root, results = tmp_path_factory.mktemp("runs"), {}
    for weighting in ("none", "dedier", "dedier-ts", "laplace"):
        teacher = [] if weighting == "none" else ["--teacher", str(root / "none" / "teacher.pt")]
        results[weighting] = run_script("train.py", *TINY, "--weighting", weighting, *teacher, "--diagnostics",
                                        "--out", str(root / weighting))
    return root, results


@pytest.mark.parametrize("weighting", ["none", "dedier", "dedier-ts", "laplace"])
def test_train_smoke_writes_every_output(tiny_runs, weighting):
    root, results = tiny_runs
    result, out = results[weighting], root / weighting
    assert result.returncode == 0, result.stderr
    assert all((out / name).is_file() for name in ("student.pt", "last.pt", "log.jsonl", "metrics.json"))
    assert (out / "teacher.pt").is_file() == (weighting == "none")
    records = read_log(out)
    assert [r["phase"] for r in records] == (["teacher"] if weighting == "none" else []) + ["student"] * 2
    assert all({"phase", "epoch", "seconds", "train_loss", "val_avg_acc", "val_worst_group_acc"} <= r.keys()
               for r in records)
    diagnostics = {"readout_temperature", "readout_prior_variance", "posterior_logit_std", "upweighted_share",
                   "weight_corr_temperature"}  # field names are a contract
    assert all(diagnostics <= r.keys() if weighting != "none" else not diagnostics & r.keys() for r in records[-2:])
    if weighting != "none":
        assert len(records[-1]["upweighted_share"]) == 4
        assert (records[-1]["readout_temperature"] is None) == (weighting == "dedier")
        assert (records[-1]["posterior_logit_std"] is not None) == (weighting == "laplace")
        assert "| T " in result.stdout  # the readout diagnostics on the printed epoch line
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["weighting"], metrics["dataset"], metrics["seed"]) == (weighting, "synth", 0)
    # recompute the student's test figures from student.pt with an explicit loop over groups
    student = K.model_from_checkpoint(K.load_checkpoint(out / "student.pt")).eval()
    data = K.make_synth(64, 16, 32, seed=0)
    with torch.no_grad():
        right = student(K.prepare_batch(data.test.images, data.mean, data.std))[-1].argmax(-1) == data.test.labels
    group_acc = [float(right[data.test.groups == g].double().mean()) for g in range(4)]
    m = metrics["student"]["test"]
    assert m["group_acc"] == pytest.approx(group_acc) and m["worst_group_acc"] == pytest.approx(min(group_acc))
    assert m["avg_acc"] == pytest.approx(float(right.double().mean()))
    assert "worst-group" in result.stdout and "student epoch   2/2" in result.stdout


def test_eval_reports_every_exit_and_the_budget_curve(tiny_runs, tmp_path):
    root, _ = tiny_runs
    result = run_script("eval.py", str(root / "laplace"), "--device", "cpu", "--json", str(tmp_path / "r.json"),
                        "--plot", str(tmp_path / "figures"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["exits"]) == 3 and len(report["budget_curve"]) == 2 * 39
    for e in report["exits"]:
        assert all({"top1", "nlpd", "ece", "worst_group_acc"} <= e[method].keys()
                   for method in ("MAP", "TS", "Laplace", "MIE", "MIE+TS", "MIE+Laplace"))
        assert 0 <= e["avcs"]["coverage"] <= 1 and 0 <= e["avcs"]["nestedness_without_intersection"] <= 1
        assert e["conformal"].keys() >= {"size", "coverage", "nestedness"} and "offset" in e["avcs_offset"]
    kinds = {row["inputs"] for row in report["far_from_data"]}
    assert kinds == {"test x2", "test x5", "test x10", "test x100", "uniform noise", "unseen shapes"}  # 2 classes
    assert all(row.keys() == {"inputs", "exit", "method", "mean_max_confidence", "auroc"} and 0 <= row["auroc"] <= 1
               for row in report["far_from_data"])
    # the same checkpoint and seed: the readout's figures equal those train.py wrote (one seeding rule)
    readout = json.loads((root / "laplace" / "metrics.json").read_text())["student"]["readout"]
    for method, name in (("MAP", "map"), ("Laplace", "laplace")):
        for metric in ("ece", "nlpd"):
            assert report["exits"][readout["exit"]][method][metric] == pytest.approx(readout[name][metric], abs=1e-6)
    assert "MIE+Laplace" in result.stdout and "prediction sets" in result.stdout
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "figures" / "reliability.png").is_file()
    except ImportError:
        assert "pip install matplotlib" in result.stderr


def exit_features_float64(model, exit_index, split, data):
    """One exit's head features (N, p) by hand in float64, eval mode (its stages, its head's body), and its linear."""
    model = copy.deepcopy(model).double().eval()
    h = K.prepare_batch(split.images, data.mean, data.std).double()
    with torch.no_grad():
        for module in itertools.chain(*model.backbone.stage_modules()[:exit_index + 1]):
            h = module(h)
        return model.heads[exit_index].features(h), model.heads[exit_index].linear


def dense_log_evidence(features, weight, bias, prior_precision):
    """The prior-dependent part of the Laplace log evidence from the dense (c(p+1))^2 posterior precision."""
    weight_tilde, U, V = dense_posterior(features, weight, bias, prior_precision)
    precision = torch.kron(torch.linalg.inv(U), torch.linalg.inv(V))  # (d, d), row-major vec(W~)
    return float(-prior_precision / 2 * weight_tilde.square().sum() + precision.shape[0] / 2 * math.log(prior_precision)
                 - torch.linalg.slogdet(precision)[1] / 2)


@pytest.mark.parametrize("weighting", ["dedier", "dedier-ts", "laplace-ml"])
def test_sample_weights_of_train_py_match_a_hand_computation(weighting):
    cfg = train.parse_args(TINY + ["--diagnostics", "--weighting", weighting, "--alpha", "0.7", "--beta", "1.5"])
    data = K.load_run_data(vars(cfg))
    splits = {name: getattr(data, name) for name in ("train", "val", "test")}
    torch.manual_seed(4)
    student = train.new_model(cfg, "student", data, torch.device("cpu"))
    _, weights, info = train.validate_and_reweight(cfg, "student", student, splits, data, torch.device("cpu"), 3)
    features, linear = exit_features_float64(student, 0, data.train, data)
    weight, bias = linear.weight.detach(), linear.bias.detach()
    if weighting == "dedier":
        probs = torch.softmax(linear(features).detach(), -1)
    elif weighting == "dedier-ts":
        val_logits = linear(exit_features_float64(student, 0, data.val, data)[0]).detach()
        nll = -torch.log_softmax(val_logits / FINE_TEMPERATURES[:, None, None], -1)[
            :, torch.arange(len(data.val)), data.val.labels].mean(1)  # (G,)
        assert info["readout_temperature"] == pytest.approx(float(FINE_TEMPERATURES[int(nll.argmin())]), rel=0.012)
        probs = torch.softmax(linear(features).detach() / info["readout_temperature"], -1)
    else:  # laplace-ml: the evidence's argmax over the grid, T = 1
        evidence = {float(tau): dense_log_evidence(features, weight, bias, float(tau))
                    for tau in torch.logspace(-4, 4, 81, dtype=f64)}
        tau = 1 / info["readout_prior_variance"]
        assert tau == pytest.approx(max(evidence, key=evidence.get)) and info["readout_temperature"] == 1.0
        normal = torch.randn(50, 2, generator=seeded(cfg.seed * train.SEED_STRIDE + 3), dtype=f64)
        probs = reference_predictive(features, *dense_posterior(features, weight, bias, tau), 1.0, normal)
        # the spread of phi~^T V phi~ over the inputs train.py saw (its bf16 head's features: on an untrained
        # network the spread is a 1e-4 effect, below the bf16 head's rounding against float64 features)
        _, used = train.readout_pass(cfg, student, splits, data, torch.device("cpu"), "train", float32_heads=False)
        _, _, V_used = dense_posterior(used.double(), weight, bias, tau)
        phi = torch.cat([used.double(), torch.ones(len(used), 1, dtype=f64)], 1)  # (N, p+1)
        variance = torch.stack([row @ V_used @ row for row in phi])  # (N,) phi~^T V phi~, one input at a time
        group_variance = torch.stack([variance[data.train.groups == g].mean() for g in range(4)
                                      if (data.train.groups == g).any()])
        assert info["posterior_variance_cv"] == pytest.approx(float(variance.std() / variance.mean()), rel=1e-2)
        assert info["posterior_variance_group_cv"] == pytest.approx(
            float(group_variance.std() / group_variance.mean()), rel=1e-2)
    top = probs.sort(-1, descending=True).values
    wrong = probs.argmax(-1) != data.train.labels
    expected = torch.where(wrong, torch.exp(1.5 * (top[:, 0] - top[:, 1]) ** 0.7), torch.ones(len(data.train), dtype=f64))
    assert wrong.any() and not wrong.all()
    torch.testing.assert_close(weights.double(), expected, rtol=1e-4, atol=1e-6)
    shares = [float((expected[data.train.groups == g] > 1).double().mean()) for g in range(4)]
    assert info["upweighted_share"] == pytest.approx(shares)
    assert info["upweighted_share_all"] == pytest.approx(float((expected > 1).double().mean()))


def test_softmax_teacher_targets_are_the_last_exit_logits_of_each_view():
    cfg = train.parse_args(TINY + ["--diagnostics"])
    data = K.load_run_data(vars(cfg))
    torch.manual_seed(6)
    teacher = train.new_model(cfg, "teacher", data, torch.device("cpu")).eval()
    targets = K.teacher_targets(teacher, data.train, data.mean, data.std, data.augment, torch.device("cpu"))
    flips = K.random_flips(len(data.train), seeded(4))
    index = torch.randperm(len(data.train), generator=seeded(5))[:40]  # any order, any subset
    x = K.prepare_batch(data.train.images[index], data.mean, data.std, "flip", flips=flips[index])
    with torch.no_grad():
        expected = teacher(x)[-1]  # (40, c)
    torch.testing.assert_close(targets(x, index, flips[index]), expected, rtol=1e-4, atol=1e-5)
    # random crops: computed per batch, never looked up
    per_batch = K.teacher_targets(teacher, data.train, data.mean, data.std, "pad", torch.device("cpu"))
    torch.testing.assert_close(per_batch(x, None, None), expected, rtol=1e-4, atol=1e-5)


def test_default_waterbirds_pair_runs_offline_from_two_local_weight_files(tmp_path, capsys, monkeypatch):
    make_waterbirds(tmp_path / "wb")
    torch.save(K.ResNet(K.BasicBlock, (2, 2, 2, 2), 1000).state_dict(), tmp_path / "resnet18.pth")
    torch.save(K.ResNet(K.Bottleneck, (3, 4, 6, 3), 1000).state_dict(), tmp_path / "resnet50.pth")
    monkeypatch.setenv("KDLAPLACE_CACHE", str(tmp_path / "cache"))
    common = ["--dataset", "waterbirds", "--data-root", str(tmp_path / "wb"), "--epochs", "1", "--device", "cpu",
              "--pretrained", str(tmp_path / "resnet18.pth")]
    train.main(common + ["--teacher-epochs", "1", "--teacher-pretrained", str(tmp_path / "resnet50.pth"),
                         "--out", str(tmp_path / "run")])
    assert "adjusted_avg_acc" in json.loads((tmp_path / "run" / "metrics.json").read_text())["student"]["test"]
    assert K.load_checkpoint(tmp_path / "run" / "teacher.pt")["model_config"]["arch"] == "resnet50"
    assert K.load_checkpoint(tmp_path / "run" / "student.pt")["model_config"]["input_size"] == 224
    # a reused teacher is loaded, never built: the student's weight file is all that is needed
    train.main(common + ["--teacher", str(tmp_path / "run" / "teacher.pt"), "--out", str(tmp_path / "reuse")])
    assert (tmp_path / "reuse" / "metrics.json").is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train.main(common + ["--teacher-pretrained", str(tmp_path / "resnet18.pth"), "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert "--teacher-pretrained" in err and "teacher (resnet50)" in err and err.count("\n") == 1


def test_resume_after_interrupt_matches_an_uninterrupted_run_and_more_epochs_continue_it(tmp_path, monkeypatch):
    args = TINY + ["--epochs", "3", "--weighting", "laplace"]
    train.main(args + ["--out", str(tmp_path / "full")])
    real_save = K.atomic_save

    def interrupt_after_first_student_epoch(obj, path):
        real_save(obj, path)
        if Path(path).name == "last.pt" and obj.get("phase") == "student":
            raise KeyboardInterrupt  # Ctrl-C right after the epoch's checkpoint

    monkeypatch.setattr(K, "atomic_save", interrupt_after_first_student_epoch)
    with pytest.raises(SystemExit) as stopped:
        train.main(args + ["--out", str(tmp_path / "cut")])
    assert stopped.value.code == 130
    monkeypatch.setattr(K, "atomic_save", real_save)
    assert K.load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 1
    train.main(args + ["--out", str(tmp_path / "cut"), "--resume"])
    full, cut = K.load_checkpoint(tmp_path / "full" / "last.pt"), K.load_checkpoint(tmp_path / "cut" / "last.pt")
    assert cut["epoch"] == full["epoch"] == 3 and torch.equal(cut["sample_weights"], full["sample_weights"])
    for key, value in full["model"].items():
        assert torch.equal(cut["model"][key], value), key
    cut_metrics, full_metrics = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("cut", "full"))
    assert cut_metrics.pop("wall_seconds") > 0 and full_metrics.pop("wall_seconds") > 0  # the process's own
    assert cut_metrics == full_metrics
    train.main(args + ["--out", str(tmp_path / "full"), "--epochs", "4", "--resume"])  # more epochs: it continues
    records = read_log(tmp_path / "full")
    assert [(r["phase"], r["epoch"]) for r in records] == [("teacher", 1)] + [("student", e) for e in range(1, 5)]
    assert "upweighted_share" in records[-1] and "weight_corr_temperature" not in records[-1]  # no --diagnostics
    assert K.load_checkpoint(tmp_path / "full" / "last.pt")["epoch"] == 4
    # argparse: the later --epochs wins, also over the longer budget that more synth classes default to
    two, ten = train.parse_args([]), train.parse_args(["--synth-classes", "10"])
    assert ten.epochs > two.epochs and ten.teacher_epochs > two.teacher_epochs and ten.lr == two.lr
    assert train.parse_args(["--synth-classes", "3", "--epochs", "5"]).epochs == 5


@pytest.mark.parametrize("flags,message", [
    (["--lr", "0"], "--lr must be > 0"), (["--alpha", "0"], "--alpha must be > 0"),
    (["--beta", "-1"], "--beta must be >= 0"), (["--synth-n-train", "8"], "--synth-n-train must be >= 16"),
    (["--teacher-epochs", "0"], "--epochs and --teacher-epochs must be >= 1"),
    (["--weighting", "softmax"], "invalid choice: 'softmax'")])
def test_train_rejects_bad_flags_with_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        train.main(flags)
    assert stopped.value.code != 0 and message in capsys.readouterr().err


def test_train_rejects_bad_runs_without_a_traceback(tiny_runs, tmp_path, capsys):
    root, _ = tiny_runs
    saved = K.load_checkpoint(root / "none" / "teacher.pt")
    saved["config"]["dataset"] = "cifar100"
    torch.save(saved, tmp_path / "cifar_teacher.pt")
    for flags, message in [
            (["--resume", "--out", str(tmp_path / "empty")], "no " + str(tmp_path / "empty" / "last.pt")),
            (["--dataset", "waterbirds", "--data-root", str(tmp_path / "nowhere")], "no dataset found; looked for"),
            (["--resume", "--arch", "resnet18-cifar", "--out", str(root / "none")], "is a run of dataset synth, "
             "synth_classes 2, arch cnn, teacher_arch cnn, weighting none, not dataset synth, synth_classes 2, arch "
             "resnet18-cifar, teacher_arch cnn, weighting laplace"),
            (["--readout-exit", "2", "--out", str(tmp_path / "r")], "--readout-exit 2"),
            (["--teacher", str(tmp_path / "cifar_teacher.pt"), "--out", str(tmp_path / "t")],
             "is a run of dataset cifar100, synth_classes 2, not dataset synth")]:
        with pytest.raises(SystemExit) as stopped:
            train.main(TINY + flags)
        err = capsys.readouterr().err
        assert stopped.value.code == 1 and message in err and "Traceback" not in err and err.count("\n") == 1, err
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "truncated.pt").write_bytes((root / "none" / "student.pt").read_bytes()[:1000])
    for name, message in (("missing", "no checkpoint at"), ("garbage.pt", "cannot be read as a weights-only torch file"),
                          ("truncated.pt", "cannot be read as a weights-only torch file")):
        with pytest.raises(SystemExit):
            evaluate_script.main([str(tmp_path / name)])
        err = capsys.readouterr().err
        assert message in err and str(tmp_path / name) in err and err.count("\n") == 1, err
    result = run_script("train.py", "--alpha", "0")  # a bad flag in a real process: argparse's exit, one line
    assert result.returncode == 2 and "Traceback" not in result.stderr and "--alpha must be > 0" in result.stderr


def test_bench_epoch_cases_count_the_multiply_adds_that_torch_counts_in_every_phase(monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    def counted(cases: dict, repeats: int, device: torch.device) -> dict:  # torch's count of each case's arithmetic
        flops = {}
        for name, fn in cases.items():
            with FlopCounterMode(display=False) as counter:
                fn()
            flops[name] = counter.get_total_flops()
        return flops

    monkeypatch.setattr(bench, "timed_rounds", counted)  # the time columns become ratios of counted arithmetic
    rows = bench.epoch_cases(torch.device("cpu"), [flag for flag in TINY if flag not in ("--device", "cpu")], None, 1)
    assert [row["case"] for row in rows] == [
        "epoch_bare_loop", "epoch_teacher", "epoch_tail_teacher", "epoch_bare_loop", "epoch_student_none",
        "epoch_tail_none", "epoch_student_dedier", "epoch_tail_dedier", "epoch_student_laplace", "epoch_tail_laplace"]
    # train.py's epoch does the bare loop's arithmetic plus its tail's, nothing more (the Laplace's own is < 0.1%)
    assert all(row["bound"] == pytest.approx(1, rel=1e-3) for row in rows if row["bound"] is not None)
    # bench's MACs ratio against torch's count: bench's "a backward is twice the forward" includes input gradients that
    # autograd skips (first convolution, detached heads' first layers), by one factor for all of a network's tails
    factors = {row["case"]: row["ratio"] / row["macs_ratio"] for row in rows if row["case"].startswith("epoch_tail")}
    assert all(1 <= factor < 1.15 for factor in factors.values())
    assert factors["epoch_tail_dedier"] == pytest.approx(factors["epoch_tail_none"], rel=0.01)
    assert factors["epoch_tail_laplace"] == pytest.approx(factors["epoch_tail_none"], rel=0.01)
    assert all(row["ratio"] == pytest.approx(row["macs_ratio"], rel=0.03) for row in rows if row["bound"] is not None)


# ── The sweep runner ────────────────────────────────────────────────────────────────────────────────────────────────

def commands(*args: str) -> list[dict]:
    """The train.py commands ``sweep.py *args`` prints: {flag: its last value, as argparse reads it, "argv": words}."""
    result = run_script("sweep.py", *args)
    assert result.returncode == 0, result.stderr
    return [{**dict(zip(words, words[1:])), "argv": words} for words in map(str.split, result.stdout.splitlines())]


def test_sweep_prints_the_two_stages_of_every_study(tmp_path):
    out = str(tmp_path / "s")
    teachers = commands("--study", "budget", "--seeds", "3", "4", "--out", out, "--print-commands", "teachers")
    students = commands("--study", "budget", "--seeds", "3", "4", "--out", out, "--print-commands", "students",
                        "--", "--epochs", "1")
    assert [c["--out"] for c in teachers] == [f"{out}/none-seed3", f"{out}/none-seed4"]
    assert all(c["argv"][:2] == ["python", "train.py"] and "--teacher" not in c and c["--weighting"] == "none"
               for c in teachers)
    assert sorted((c["--weighting"], c["--seed"]) for c in students) == sorted(
        (w, s) for w in ("dedier", "dedier-ts", "laplace") for s in ("3", "4"))
    assert all(c["--teacher"] == f"{out}/none-seed{c['--seed']}/teacher.pt" and c["argv"][-2:] == ["--epochs", "1"]
               for c in students)
    sizes = commands("--study", "data-size", "--seeds", "0", "--out", out, "--print-commands", "students")
    assert sorted((c["--weighting"], c["--synth-n-train"]) for c in sizes) == sorted(
        (w, str(n)) for w in ("dedier", "dedier-ts", "laplace", "laplace-ml") for n in (600, 1200, 2400, 4800))
    assert all(c["--teacher"] == f"{out}/none-n{c['--synth-n-train']}-seed0/teacher.pt" for c in sizes)
    table = {stage: commands("--study", "table", "--seeds", "0", "1", "--fresh-seeds", "5", "--out", out,
                             "--print-commands", stage) for stage in ("teachers", "students")}
    assert sorted(c["--out"].split("/")[-1] for c in table["teachers"]) == [
        "erm-seed0", "erm-seed1", "none-seed0", "none-seed1", "none-seed5"]
    assert len(table["students"]) == 2 * 5 * 9  # the grid; seed 5's runs wait for the selection


def fake_finished_run(folder: Path, seed: int, val_worst_group: float) -> None:
    """A run folder as sweep.py reads a finished one: metrics.json (validation and test scores) and log.jsonl."""
    folder.mkdir(parents=True)
    scores = {"worst_group_acc": val_worst_group, "avg_acc": 0.9}
    readout = {kind: {"ece": 0.1} for kind in ("map", "temperature", "laplace")}
    (folder / "metrics.json").write_text(json.dumps({"seed": seed, "teacher": {"test": scores},
                                                     "student": {"val": scores, "test": scores, "readout": readout}}))
    (folder / "log.jsonl").write_text(json.dumps({"phase": "student", "epoch": 1, "val_worst_group_acc": 0.5}) + "\n")


def test_sweep_table_selects_each_weighting_once_its_own_grid_has_finished(tmp_path):
    out = tmp_path / "table"
    # laplace's grid on seed 0 finished, (1, 4) best on validation; dedier's one run
    for a, b in itertools.product(sweep.GRID_ALPHAS, sweep.GRID_BETAS):
        fake_finished_run(out / f"{sweep.grid_name('laplace', a, b)}-seed0", 0, 0.8 if (a, b) == (1, 4) else 0.6)
    fake_finished_run(out / f"{sweep.grid_name('dedier', 1, 1)}-seed0", 0, 0.9)
    fake_finished_run(out / "none-seed0", 0, 0.4)
    assert sweep.select_grid_points([0], out) == {"laplace": "laplace_a1_b4"}
    assert sweep.complete_selection([0], out) == {}  # what the lr study waits for
    fresh = [c for c in commands("--study", "table", "--seeds", "0", "--fresh-seeds", "5", "--out", str(out),
                                 "--print-commands", "students") if c["--seed"] == "5"]
    assert [(c["--weighting"], c["--alpha"], c["--beta"]) for c in fresh] == [("laplace", "1", "4")]
    lines = sweep.table_lines([0], [5], out)
    assert any(line.startswith("| laplace, tuned (α=1, β=4) | 80.0 |") for line in lines)
    assert any(line.startswith("Not selected yet") and "dedier, dedier-ts, laplace-cv, laplace-ml" in line
               for line in lines)
    assert "| 1 | 4 | – | – | **80.0 / 80.0** | – | – |" in lines


def test_sweep_lr_study_reuses_the_tables_runs_at_its_selected_points(tmp_path):
    table = tmp_path / "table"
    lr_students = "--study lr --seeds 0 --fresh-seeds 5 --print-commands students --out".split() + [str(table)]
    waiting = run_script("sweep.py", *lr_students)
    assert waiting.stdout == "" and "wait for the table's selection" in waiting.stderr
    # seed 0's grid, finished: (0.5, 2) scores best on validation
    for w, a, b in itertools.product(sweep.TUNED_WEIGHTINGS, sweep.GRID_ALPHAS, sweep.GRID_BETAS):
        fake_finished_run(table / f"{sweep.grid_name(w, a, b)}-seed0", 0, 0.9 if (a, b) == (0.5, 2) else 0.5)
    rates = commands(*lr_students)
    # every weighting at 0.02 and 0.01 on the selection seed (its 0.05 runs are the table's); seed 5 waits for the rates
    assert sorted((c["--weighting"], c["--lr"], c["--seed"]) for c in rates) == sorted(
        (w, lr, "0") for w in sweep.WEIGHTINGS for lr in ("0.02", "0.01"))
    assert all((c["--alpha"], c["--beta"]) == ("0.5", "2") for c in rates if "--alpha" in c)
    assert all(c["--teacher"] == f"{table}/none-seed0/teacher.pt" and c["--epochs"] == "12" for c in rates)
    fake_finished_run(table / "none-seed0", 0, 0.5)  # plain KD at 0.05: the table's teacher run
    for c in rates:  # 0.02 scores best on validation for every weighting
        fake_finished_run(Path(c["--out"]), 0, 0.95 if c["--lr"] == "0.02" else 0.5)
    assert sorted((c["--weighting"], c["--lr"], c["--seed"]) for c in commands(*lr_students)) == sorted(
        (w, "0.02", "5") for w in sweep.WEIGHTINGS)  # the fresh seed at each weighting's selected rate only
    assert any(line.startswith("| dedier (0.5, 2) | 0.05: 90.0, 0.02: 95.0, 0.01: 50.0 | 0.02 | 95.0 |")
               for line in sweep.lr_lines([0], [5], table))


@pytest.mark.parametrize("study", ["table", "budget", "lr", "data-size"])
def test_sweep_shards_partition_each_stage(study):
    runs = sweep.STUDIES[study].runs(sweep.STUDIES[study].seeds, sweep.STUDIES[study].fresh_seeds, Path("nowhere"))
    names = [run.name for i in (1, 2, 3) for run in sweep.shard(runs, f"{i}/3")]
    assert sorted(names) == sorted(run.name for run in runs) and len(set(names)) == len(names)


def test_sweep_slots_split_the_cores_and_gpus_and_a_bad_shard_or_too_many_jobs_are_refused(monkeypatch):
    result = run_script("sweep.py", "--study", "budget", "--shard", "4/3")
    assert result.returncode == 2 and "--shard 4/3: expected I/N with 1 <= I <= N" in result.stderr
    cores = len(os.sched_getaffinity(0))  # the real count: before the monkeypatch below
    result = run_script("sweep.py", "--study", "budget", "--jobs", str(cores + 1), "--", "--device", "cpu")
    assert result.returncode == 1 and f"--jobs {cores + 1}: more runs than the {cores} cores" in result.stderr
    assert "Traceback" not in result.stderr
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7}, raising=False)
    slots = sweep.slot_resources(4, 2, ["3", "5"])  # 4 runs, 2 per GPU, on the GPUs CUDA_VISIBLE_DEVICES names
    assert [slot["gpu"] for slot in slots] == ["3", "3", "5", "5"]
    assert [slot["cores"] for slot in slots] == [[0, 1], [2, 3], [4, 5], [6, 7]]  # disjoint, every core used
    slots = sweep.slot_resources(3, 1, [])
    assert [slot["gpu"] for slot in slots] == [None] * 3 and sorted(sum((s["cores"] for s in slots), [])) == list(range(8))
    assert all(len(slot["cores"]) >= 2 for slot in slots)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_sweep_jobs_2_runs_a_tiny_study_to_the_end_without_oversubscribing(tmp_path):
    result = run_script("sweep.py", "--study", "budget", "--seeds", "0", "1", "--jobs", "2", "--out", str(tmp_path),
                        "--", *TINY)
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = [json.loads(path.read_text()) for path in tmp_path.glob("*/metrics.json")]
    assert len(metrics) == 8
    assert all(m["threads"] * 2 <= len(os.sched_getaffinity(0)) for m in metrics)  # 2 at a time, each on its half
    table = (tmp_path / "budget.md").read_text()
    alpha, beta = train.SYNTH_SELECTED["dedier-ts"]  # the row names the point its runs used
    assert "- runs finished: 8 of 8" in table and "- code version: `" in table and f"| dedier-ts ({alpha:g}, {beta:g}) |" in table


def test_a_killed_sweep_resumes_its_interrupted_run(tmp_path):
    args = [sys.executable, "sweep.py", "--study", "budget", "--seeds", "0", "--out", str(tmp_path), "--", *TINY,
            "--epochs", "3"]
    process = subprocess.Popen(args, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    deadline = time.time() + 240
    while time.time() < deadline:  # until a student run has a last.pt and no metrics.json yet
        interrupted = [p.parent for p in tmp_path.glob("*/last.pt") if not (p.parent / "metrics.json").exists()
                       and K.load_checkpoint(p).get("phase") == "student"]
        if interrupted:
            break
        time.sleep(0.02)
    os.killpg(process.pid, 9)  # the sweep and its train.py, at once
    process.wait()
    assert interrupted, "no student run was caught mid-way"
    done = {p.parent.name: p.stat().st_mtime for p in tmp_path.glob("*/metrics.json")}
    result = subprocess.run(args, cwd=HERE, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(list(tmp_path.glob("*/metrics.json"))) == 4
    assert all((tmp_path / name / "metrics.json").stat().st_mtime == stamp for name, stamp in done.items())
    launches = [line for line in (interrupted[0] / "train.log").read_text().splitlines() if " train.py " in line]
    assert len(launches) == 2 and launches[1].endswith("--resume") and not launches[0].endswith("--resume")
    assert [r["epoch"] for r in read_log(interrupted[0]) if r["phase"] == "student"] == [1, 2, 3]


def test_wilson_interval_solves_its_defining_equation_and_bootstrap_matches_the_exact_distribution():
    # the Wilson interval's ends are the p with |p_hat - p| = z sqrt(p (1 - p) / n): found here by bisection
    for successes, trials in ((953, 1000), (0, 50), (50, 50), (17, 40)):
        p_hat, z = successes / trials, 1.959964
        gap = lambda p: abs(p_hat - p) - z * math.sqrt(p * (1 - p) / trials)  # noqa: E731

        def root(low, high):  # gap(low) and gap(high) of opposite signs
            for _ in range(200):
                middle = (low + high) / 2
                low, high = (middle, high) if (gap(middle) > 0) == (gap(low) > 0) else (low, middle)
            return (low + high) / 2
        expected = (0.0 if successes == 0 else root(0.0, p_hat), 1.0 if successes == trials else root(p_hat, 1.0))
        assert sweep.wilson_interval(successes, trials) == pytest.approx(expected, abs=1e-9)
    values = [0.0, 1.0, 3.0, 7.0]  # the bootstrap's: all 256 equally likely resamples of 4 values, enumerated
    means = [sum(resample) / 4 for resample in itertools.product(values, repeat=4)]
    exact = np.quantile(means, [0.025, 0.975], method="inverted_cdf")  # the quantiles the random resamples estimate
    # (their CDF steps lie 0.006 or more from 0.025 and 0.975: far beyond 200000 resamples' sampling error)
    assert sweep.bootstrap_interval(values, resamples=200000) == tuple(exact)
    assert sweep.bootstrap_interval([2.0, 2.0]) == (2.0, 2.0)
