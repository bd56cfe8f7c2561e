"""kdlaplace: fairer knowledge distillation through uncertainty-aware early exits.

One module, read top to bottom like a lecture: the mathematics first, then the machinery.

  1. Losses        knowledge distillation, DEDIER sample weights, group DRO, the readouts' loss.
  2. Laplace       closed-form KFAC last-layer Laplace: fit, predict (MC / probit), tune (T, sigma^2) on
                   validation NLL (NLPD) or the prior by the marginal likelihood, cross-fitted predictions.
  3. Ensembles     model-internal ensemble (MIE) and budgeted early exit.
  4. Sets          nested prediction sets of early exits: AVCS (Dirichlet and Laplace) and split conformal.
  5. Metrics       group accuracies, worst-group accuracy, ECE, AUROC.
  6. Networks      early-exit networks: exit heads, a small CNN, the DEDIER readout.
  7. Data          a synthetic spurious-correlation benchmark; Waterbirds, CelebA and CIFAR-100 read in
                   their distributed formats, decoded once into a uint8 cache, augmented on the device.
  8. Running       device choice, batched inference over a split, each weighting's readout predictive, seeding,
                   atomic checkpoints.
  9. ResNets       torchvision-compatible ResNet-18/50 (ImageNet weights through torch.hub) and build_model.

Every public function and class of sections 1-5 is a copyable unit: it runs when pasted, together with the
public units its docstring names, into a file that holds only ``from __future__ import annotations`` and the
imports of math, numpy as np, torch, torch.nn as nn and torch.nn.functional as F (a test checks each one).
The formulas are in the docstrings, with the paper each follows. ``pytest test_kdlaplace.py`` checks every
numerical routine against a brute-force float64 reference; ``python bench.py`` measures speed.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import pickle
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


# ══════════════════════════════════════════════════════════════════════════════
#  1. Losses: knowledge distillation, DEDIER weights, group DRO
# ══════════════════════════════════════════════════════════════════════════════


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, T: float) -> Tensor:
    """Per-sample distillation loss: ``T^2 * KL(teacher || student)`` at temperature ``T``.

    ``q = softmax(z / T)``;  ``kd_n = T^2 * sum_k q_t,nk (log q_t,nk - log q_s,nk)``.
    The ``T^2`` keeps the gradient scale about independent of ``T`` (exactly as ``T`` grows large).
    Hinton, Vinyals & Dean (2015), *Distilling the Knowledge in a Neural Network*, section 2.

    Shapes: ``student_logits``, ``teacher_logits`` (N, c) -> (N,). Computed in at least fp32 (safe under bf16
    autocast). To distil from probabilities ``p`` pass ``teacher_logits = log p``: a class the teacher gives
    probability 0 (logit ``-inf``) adds ``0 log 0 = 0``, as in the definition of the KL divergence.
    """
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"kd_loss: student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must both have shape (N, c)")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # never below fp32
    log_q_student = F.log_softmax(student_logits.to(dtype) / T, dim=-1)  # (N, c)
    log_q_teacher = F.log_softmax(teacher_logits.to(dtype) / T, dim=-1)  # (N, c)
    # reduction="none" + sum over classes: "mean" would divide by N*c, a classic KD bug
    terms = F.kl_div(log_q_student, log_q_teacher, reduction="none", log_target=True)  # (N, c)
    # kl_div forms exp(t) (t - s), which is 0 * (-inf) = NaN where the teacher's probability is 0
    kl = terms.masked_fill(log_q_teacher == -math.inf, 0.0).sum(-1)  # (N,)
    return T * T * kl


def confidence_margin(probs: Tensor) -> Tensor:
    """Confidence margin ``cm(p) = p_(1) - p_(2)``: largest minus second-largest probability.

    Tiwari et al. (WACV 2024), *Using Early Readouts to Mediate Featural Bias in Distillation*, eq. (2).
    Shapes: ``probs`` (N, c) with c >= 2 -> (N,).
    """
    if probs.dim() != 2 or probs.shape[1] < 2:
        raise ValueError(f"confidence_margin: probs must have shape (N, c) with c >= 2, got {tuple(probs.shape)}")
    top2 = probs.topk(2, dim=-1).values  # (N, 2)
    return top2[:, 0] - top2[:, 1]


def dedier_weights(probs: Tensor, y: Tensor, alpha: float, beta: float) -> Tensor:
    """DEDIER sample weights: ``w_n = exp(beta * cm(p_n) ** alpha)`` where the readout is wrong, else 1.

    A confidently wrong early readout marks a sample the network solves with shortcut features; it gets
    up-weighted. ``alpha`` is an exponent on the margin (as in the authors' code), ``beta`` a scale.
    Tiwari et al. (WACV 2024), eq. (3). Shapes: ``probs`` (N, c), ``y`` (N,) -> (N,).
    Copy it with :func:`confidence_margin`.
    """
    margin = confidence_margin(probs)  # (N,)
    wrong = probs.argmax(dim=-1) != y  # (N,)
    return torch.where(wrong, torch.exp(beta * margin ** alpha), torch.ones_like(margin))


def student_loss(student_logits: Tensor, teacher_logits: Tensor, y: Tensor, weights: Optional[Tensor],
                 lam: float, T: float) -> Tensor:
    """Weighted distillation objective ``mean_n w_n * ((1 - lam) * CE_n + lam * KD_n)``.

    ``CE_n`` is cross-entropy with the true label, ``KD_n`` is :func:`kd_loss`. The weight multiplies both
    terms, as in the DEDIER authors' code. ``weights=None`` means all ones (plain KD).
    Tiwari et al. (WACV 2024), eq. (4); Hinton et al. (2015). Shapes: logits (N, c), y (N,), weights (N,).
    """
    if weights is not None and weights.shape != y.shape:
        raise ValueError(f"student_loss: weights must have shape {tuple(y.shape)}, got {tuple(weights.shape)}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    cross_entropy = F.cross_entropy(student_logits.to(dtype), y, reduction="none")  # (N,)
    per_sample = (1.0 - lam) * cross_entropy + lam * kd_loss(student_logits, teacher_logits, T)  # (N,)
    if weights is None:
        return per_sample.mean()
    return (weights.to(dtype) * per_sample).mean()


def group_dro_loss(per_sample_loss: Tensor, groups: Tensor, group_weights: Tensor,
                   step_size: float) -> tuple[Tensor, Tensor]:
    """Online group DRO: exponentiated-gradient step on the group weights, then their weighted loss.

    ``q_g <- q_g * exp(eta * L_g)``, ``q <- q / sum q``, loss ``= sum_g q_g L_g`` with ``L_g`` the mean loss of
    group ``g`` in the batch (0 for groups absent from it).
    Sagawa et al. (ICLR 2020), Algorithm 1 in its minibatch form (every ``q_g`` from its batch mean, the authors' code).
    Shapes: ``per_sample_loss`` (N,), ``groups`` (N,) int64, ``group_weights`` (G,) -> (scalar, (G,)).
    """
    n_groups = group_weights.shape[0]
    sums = torch.zeros(n_groups, dtype=per_sample_loss.dtype, device=per_sample_loss.device)
    sums = sums.index_add(0, groups, per_sample_loss)  # (G,)
    # counted by index_add, not bincount: bincount sizes its output from the data, a host sync on CUDA every step
    counts = torch.zeros_like(sums).index_add(0, groups, torch.ones_like(per_sample_loss)).clamp(min=1)  # (G,)
    group_loss = sums / counts  # (G,)
    new_weights = group_weights * torch.exp(step_size * group_loss.detach())  # (G,)
    new_weights = new_weights / new_weights.sum()
    return (new_weights * group_loss).sum(), new_weights


def early_exit_loss(logits: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the early exits ``logits[:-1]``: what trains the readouts (on detached features
    unless the exits are trained jointly). ``logits``: K x (N, c), ``y`` (N,) -> scalar."""
    return sum(F.cross_entropy(z.float(), y) for z in logits[:-1])


# ══════════════════════════════════════════════════════════════════════════════
#  2. Closed-form KFAC last-layer Laplace
# ══════════════════════════════════════════════════════════════════════════════
# For a linear softmax head z = W~ phi~ the Hessian of the cross-entropy w.r.t. z, diag(p) - p p^T, does not depend
# on the label, so GGN = Fisher = Hessian, and the KFAC factors are exact averages given by two matrix products.

class KFACLaplace:
    """Kronecker-factored Laplace posterior over one exit's last linear layer, in closed form.

    Fit (Ritter et al. 2018; Meronen et al. 2024, *Fixing Overconfidence in Dynamic Neural Networks*, section 3),
    with ``phi~ = [phi, 1]``, ``p_n`` the MAP softmax probabilities and ``N`` samples:

        A = (1/N) sum_n phi~_n phi~_n^T                      (p+1, p+1)
        G = (1/N) sum_n diag(p_n) - p_n p_n^T = (diag(sum_n p_n) - P^T P) / N      (c, c)
        U = (sqrt(N) G + sqrt(tau) I_c)^-1,  V = (sqrt(N) A + sqrt(tau) I_{p+1})^-1,  Cov(vec W~) = U (x) V

    ``tau`` is the prior precision (``1 / sigma^2``). Damping each factor (as laplace-torch's
    ``KronDecomposed(..., dampen=True)``; its default adds ``tau`` to the eigenvalues of ``N G (x) A``) keeps the
    posterior Kronecker, so the logit predictive is ``f(x) ~ N(W~ phi~, (phi~^T V phi~) U)``. ``temperature``
    divides the logits before the softmax (Meronen's logit temperature). ``A``, ``G``: float64 (summed in the inputs'
    dtypes); ``eigen``: their eigendecompositions; ``n``: N; ``weight``: ``W~`` (c, p+1), or (c, p) without a bias.
    """

    # the decade grids where tune_temperature and tune_laplace start their searches; their ends bound every choice
    TEMPERATURE_GRID = tuple(10.0 ** k for k in range(-2, 3))  # 0.01 .. 100
    PRIOR_VARIANCE_GRID = tuple(10.0 ** k for k in range(-4, 5))  # 1e-4 .. 1e4

    def __init__(self, weight: Tensor, A: Tensor, G: Tensor, n: int, has_bias: bool, prior_precision: float = 1.0,
                 temperature: float = 1.0, eigen: Optional[tuple[Tensor, ...]] = None) -> None:
        self.weight, self.A, self.G, self.n, self.has_bias = weight, A, G, n, has_bias
        self.prior_precision, self.temperature = float(prior_precision), float(temperature)
        # A = Q_A diag(a) Q_A^T and G = Q_G diag(g) Q_G^T once: every prior precision is then a diagonal rescale
        self.eigen = eigen or (*torch.linalg.eigh(A), *torch.linalg.eigh(G))  # a (p+1,), Q_A, g (c,), Q_G

    @classmethod
    def fit(cls, features: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
            prior_precision: float = 1.0, temperature: float = 1.0) -> "KFACLaplace":
        """Fit ``A`` and ``G`` from stacked last-layer inputs ``features`` (N, p) and the head's ``weight`` (c, p),
        ``bias`` (c,) or None: two matrix products, no loop."""
        if features.dim() != 2 or weight.dim() != 2 or features.shape[1] != weight.shape[1]:
            raise ValueError(f"KFACLaplace.fit: features (N, p) and weight (c, p) must share p, got "
                             f"{tuple(features.shape)} and {tuple(weight.shape)}")
        weight_tilde, phi = weight.detach().to(features.dtype), features  # (c, p), (N, p)
        if bias is not None:
            weight_tilde = torch.cat([weight_tilde, bias.detach().to(features.dtype)[:, None]], dim=1)  # (c, p+1)
            phi = torch.cat([features, torch.ones_like(features[:, :1])], dim=1)  # (N, p+1)
        probs = torch.softmax((phi @ weight_tilde.T).to(torch.promote_types(phi.dtype, torch.float32)), -1)  # (N, c)
        A = (phi.T @ phi).double() / phi.shape[0]  # (p+1, p+1)
        G = (torch.diag(probs.sum(0)) - probs.T @ probs).double() / phi.shape[0]  # (c, c)
        return cls(weight_tilde, A, G, phi.shape[0], bias is not None, prior_precision, temperature)

    def with_hyperparameters(self, prior_precision: Optional[float] = None,
                             temperature: Optional[float] = None) -> "KFACLaplace":
        """A copy with another prior precision and/or temperature; shares the fitted factors (no refit)."""
        return KFACLaplace(self.weight, self.A, self.G, self.n, self.has_bias,
                           self.prior_precision if prior_precision is None else prior_precision,
                           self.temperature if temperature is None else temperature, self.eigen)

    def factor(self, name: str) -> Tensor:
        """``U = Q_G diag(1 / (sqrt(N) g + sqrt(tau))) Q_G^T`` (c, c) for ``name="U"``, ``V`` (p+1, p+1) likewise from
        ``A`` for ``"V"``: the posterior covariance is ``Cov(vec W~) = U (x) V`` (row-major vec), float64."""
        eigenvalues, eigenvectors = self.eigen[2:] if name == "U" else self.eigen[:2]
        damped = 1.0 / (math.sqrt(self.n) * eigenvalues.clamp(min=0) + math.sqrt(self.prior_precision))
        return (eigenvectors * damped) @ eigenvectors.T

    def logit_distribution(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Gaussian logit predictive ``f ~ N(mean, scale * U)``: ``mean = W~ phi~`` (N, c), ``scale = phi~^T V phi~``
        (N,), the latter in V's eigenbasis, ``sum_j (phi~^T q_j)^2 / (sqrt(N) a_j + sqrt(tau))``, without forming V."""
        width = self.weight.shape[1] - int(self.has_bias)
        if features.dim() != 2 or features.shape[1] != width:
            raise ValueError(f"features must have shape (N, {width}) for this Laplace, got {tuple(features.shape)}")
        phi = torch.cat([features, torch.ones_like(features[:, :1])], 1) if self.has_bias else features  # (N, p+1)
        eigenvalues, eigenvectors = self.eigen[:2]
        damped = 1.0 / (math.sqrt(self.n) * eigenvalues.clamp(min=0) + math.sqrt(self.prior_precision))  # (p+1,)
        scale = (phi @ eigenvectors.to(phi.dtype)).square() @ damped.to(phi.dtype)  # (N,)
        return phi @ self.weight.to(phi.dtype).T, scale

    def logit_std(self, features: Tensor) -> Tensor:
        """How far the posterior can move the temperature-scaled logits of each input: the root-mean-square over
        classes of their standard deviations, ``sqrt(scale * mean_k U_kk) / T`` (N,), float64."""
        scale = self.logit_distribution(features)[1]  # (N,)
        return (scale.double() * self.factor("U").diagonal().mean()).sqrt() / self.temperature

    def predict(self, features: Tensor, n_samples: int = 50, link: str = "mc",
                generator: Optional[torch.Generator] = None, log: bool = False) -> Tensor:
        """Predictive probabilities (N, c) with the logit temperature ``T`` applied, or their logarithm (``log``).

        ``link="mc"``: ``(1/S) sum_s softmax((mean + sqrt(scale) L g_s) / T)``, ``L = cholesky(U)``, ``g_s ~ N(0, I_c)``
        shared by every input (Meronen's ``2 c S + 2 p^2`` flops per input); ``log`` takes a ``logsumexp`` over ``s``,
        which never underflows. ``link="probit"``: ``softmax((mean / T) / sqrt(1 + pi/8 * scale * diag(U) / T^2))``
        (MacKay's 1992 binary probit per class, as Meronen et al. 2024). In float32 a probability below ~1e-45 is 0
        (``log`` or float64: not)."""
        if link not in ("mc", "probit"):
            raise ValueError(f"link must be 'mc' or 'probit', got {link!r}")
        mean, scale = self.logit_distribution(features)  # (N, c), (N,)
        U = self.factor("U")  # (c, c)
        if link == "probit":
            return self.probit_softmax(mean, scale[:, None] * U.diagonal().to(mean.dtype), self.temperature, log)
        normal = torch.randn(n_samples, U.shape[0], generator=generator, dtype=torch.float64, device=U.device)  # (S, c)
        directions = (normal @ torch.linalg.cholesky(U).T).to(mean.dtype)  # (S, c)
        return self.mc_softmax_mean(mean, scale, directions, self.temperature, log)

    @staticmethod
    def probit_softmax(mean: Tensor, variance: Tensor, temperature: float, log: bool = False) -> Tensor:
        """Probit-approximated predictive ``softmax((mean/T) / sqrt(1 + pi/8 var / T^2))`` (N, c), or its
        ``log_softmax`` when ``log``. Shapes: ``mean``, ``variance`` (N, c)."""
        kappa = torch.rsqrt(1.0 + math.pi / 8.0 * variance / temperature ** 2)  # (N, c)
        scaled_logits = mean / temperature * kappa  # (N, c)
        return torch.log_softmax(scaled_logits, dim=-1) if log else torch.softmax(scaled_logits, dim=-1)

    @staticmethod
    def mc_softmax_mean(mean: Tensor, scale: Tensor, directions: Tensor, temperature: float,
                        log: bool = False) -> Tensor:
        """``(1/S) sum_s softmax((mean + sqrt(scale) L g_s) / T)`` (N, c), or its logarithm by a logsumexp over
        ``s`` when ``log``. Shapes: ``mean`` (N, c), ``scale`` (N,), ``directions`` ``L g_s`` (S, c)."""
        # a CPU softmax over a short last axis runs row by row: few classes go first, many last (contiguous rows)
        classes_first = mean.shape[1] <= 8
        std = scale.sqrt() / temperature  # (N,)
        logits = torch.addcmul(mean.T[:, None, :] / temperature, std, directions.T[:, :, None]) if classes_first \
            else torch.addcmul(mean / temperature, std[:, None], directions[:, None, :])  # (c, S, N) or (S, N, c)
        axis = 0 if classes_first else -1
        if log:
            log_probs = torch.logsumexp(torch.log_softmax(logits, dim=axis), dim=-2 if classes_first else 0)
            log_probs = log_probs - math.log(directions.shape[0])
            return log_probs.T if classes_first else log_probs  # (N, c)
        probs = torch.softmax(logits, dim=axis).mean(1 if classes_first else 0)
        return probs.T if classes_first else probs  # (N, c)


def nlpd(probs: Tensor, y: Tensor) -> float:
    """Negative log predictive density ``-(1/N) sum_n log p_hat(y_n | x_n)``, p clamped at 1e-12: the validation
    criterion of the temperature and Laplace tuners below and a test metric. Shapes: ``probs`` (N, c), ``y`` (N,)."""
    if probs.dim() != 2 or y.shape != probs.shape[:1]:
        raise ValueError(f"nlpd: probs (N, c) and y (N,) expected, got {tuple(probs.shape)} and {tuple(y.shape)}")
    return float(-torch.log(probs.gather(1, y[:, None]).clamp(min=1e-12)).mean())


def minimise_bracketed(objective: Callable[[float], float], grid: Sequence[float],
                       tolerance: float = 1e-4) -> tuple[float, float]:
    """``(x, objective(x))`` for the minimiser ``x`` of ``objective`` on ``[grid[0], grid[-1]]``: the best point of
    the increasing ``grid``, refined by golden-section search between that point's two neighbours.

    The grid locates the basin; only between the best grid point's neighbours is ``objective`` assumed unimodal.
    There golden section keeps a bracket ``[a, b]`` and inner points ``c < d``; the side beyond the worse inner point
    cannot hold the minimum, so each step drops it, shrinking the bracket by ``1/phi = 0.618`` for one evaluation,
    until it is ``tolerance`` wide. Never worse than the best grid point; a minimum at a grid end comes back as that
    end. Kiefer (1953), *Sequential minimax search for a maximum*.
    """
    values = [objective(x) for x in grid]
    best = min(range(len(grid)), key=values.__getitem__)  # the first of tied minima
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    inverse_phi = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - inverse_phi * (b - a), a + inverse_phi * (b - a)
    value_c, value_d = objective(c), objective(d)
    while b - a > tolerance:
        if value_c <= value_d:  # the minimum is in [a, d]
            b, d, value_d = d, c, value_c
            c = b - inverse_phi * (b - a)
            value_c = objective(c)
        else:  # the minimum is in [c, b]
            a, c, value_c = c, d, value_d
            d = a + inverse_phi * (b - a)
            value_d = objective(d)
    x = (a + b) / 2.0
    value = objective(x)
    return (x, value) if value < values[best] else (grid[best], values[best])


def tune_temperature(logits_val: Tensor, y_val: Tensor, criterion: Optional[Callable[[Tensor], float]] = None) -> float:
    """Temperature scaling: the ``T`` that minimises the validation NLL of ``softmax(z / T)``.

    ``argmin_T -(1/N) sum_n log softmax(z_n / T)_{y_n}`` over ``log T`` by :func:`minimise_bracketed` on
    ``KFACLaplace.TEMPERATURE_GRID`` (0.01 .. 100), to a relative 1e-4. The exact NLL is convex in ``1/T`` (log-sum-exp
    of linear functions minus a linear one), so unimodal in ``log T``; :func:`nlpd`'s clamp at 1e-12 caps a confident
    mistake's term at 27.6, which can favour small ``T`` (then convexity fails). 0.01 and 100 are the range's ends.
    ``criterion(probs (N, c)) -> float`` replaces the NLL (an ensemble's; no convexity claimed). Guo et al. (ICML
    2017), section 4.2. Shapes: ``logits_val`` (N, c), ``y_val`` (N,).
    Copy it with :class:`KFACLaplace`, :func:`nlpd` and :func:`minimise_bracketed`.
    """
    logits = logits_val.double()  # (N, c)
    if criterion is None:
        def criterion(probs: Tensor) -> float:
            return nlpd(probs, y_val)

    def objective(log_temperature: float) -> float:
        return criterion(torch.softmax(logits / math.exp(log_temperature), dim=-1))

    log_grid = [math.log(t) for t in KFACLaplace.TEMPERATURE_GRID]
    return math.exp(minimise_bracketed(objective, log_grid)[0])


def tune_laplace(laplace: KFACLaplace, features_val: Tensor, y_val: Tensor, n_samples: int = 50, link: str = "mc",
                 generator: Optional[torch.Generator] = None,
                 criterion: Optional[Callable[[Tensor], float]] = None) -> KFACLaplace:
    """Copy of ``laplace`` with the ``(T, sigma^2)`` that minimise the validation NLL; no refit (shared factors).

    ``argmin_{T, sigma^2} -(1/N) sum_n log p_hat(y_n | x_n)`` (:func:`nlpd`) along the profile ``min_T NLL(T, sigma^2)``:
    for each ``sigma^2`` of ``KFACLaplace.PRIOR_VARIANCE_GRID`` (1e-4 .. 1e4, increasing), ``T`` by
    :func:`minimise_bracketed` (to 3%) within half a decade of the previous ``sigma^2``'s ``T``, the first from the
    softmax's :func:`tune_temperature` (the limit ``sigma^2 -> 0``), inside 0.01 .. 100; then the best ``sigma^2`` is
    refined between its grid neighbours at its ``T`` (to 5%). The NLL is not known to be unimodal: a coupled valley (a
    wider posterior wants a lower ``T``) traps a search along one axis at a time, which the profile follows;
    unimodality is assumed within each bracket only. A choice at a range's end is that end, not a minimum.
    One set of normal draws serves every candidate (common random numbers: a fair comparison, an objective smooth in
    ``T``). ``criterion(probs (N, c)) -> float`` replaces the NLL (an ensemble's NLL).
    Meronen et al. (2024), section 4 and appendix (their grid: T 0.3 .. 3, sigma^2 0.5 .. 4).
    Shapes: ``features_val`` (N, p), ``y_val`` (N,).
    Copy it with :class:`KFACLaplace`, :func:`nlpd`, :func:`minimise_bracketed` and :func:`tune_temperature`.
    """
    if y_val.shape != features_val.shape[:1]:
        raise ValueError(f"y_val must have shape ({features_val.shape[0]},), got {tuple(y_val.shape)}")
    if link not in ("mc", "probit"):
        raise ValueError(f"link must be 'mc' or 'probit', got {link!r}")
    if criterion is None:
        def criterion(probs: Tensor) -> float:
            return nlpd(probs, y_val)
    mean = laplace.logit_distribution(features_val)[0]  # (N, c): the same for every prior
    normal = torch.randn(n_samples, mean.shape[1], generator=generator, dtype=torch.float64,
                         device=mean.device)  # (S, c): the draws of every candidate

    def objective_at(log_variance: float) -> Callable[[float], float]:
        """The validation criterion at prior variance ``exp(log_variance)`` as a function of ``log T``."""
        candidate = laplace.with_hyperparameters(prior_precision=math.exp(-log_variance))
        scale = candidate.logit_distribution(features_val)[1]  # (N,)
        U = candidate.factor("U")  # (c, c)
        variance = scale[:, None] * U.diagonal().to(mean.dtype)  # (N, c): the probit's
        directions = (normal @ torch.linalg.cholesky(U).T).to(mean.dtype)  # (S, c): the MC's

        def objective(log_temperature: float) -> float:
            temperature = math.exp(log_temperature)
            probs = candidate.probit_softmax(mean, variance, temperature) if link == "probit" else \
                candidate.mc_softmax_mean(mean, scale, directions, temperature)  # (N, c)
            value = float(criterion(probs))
            return math.inf if math.isnan(value) else value
        return objective

    low, high = math.log(KFACLaplace.TEMPERATURE_GRID[0]), math.log(KFACLaplace.TEMPERATURE_GRID[-1])
    half_decade = math.log(10.0) / 2  # the step in log T from one prior variance to the next
    log_variances = [math.log(v) for v in KFACLaplace.PRIOR_VARIANCE_GRID]
    log_temperature = math.log(tune_temperature(mean, y_val, criterion))  # the limit sigma^2 -> 0
    profile = []  # (criterion, log sigma^2, log T) at every prior of the grid
    for log_variance in log_variances:  # increasing: each prior starts from the previous prior's T
        bracket = sorted({max(log_temperature - half_decade, low), log_temperature, min(log_temperature + half_decade, high)})
        log_temperature, value = minimise_bracketed(objective_at(log_variance), bracket, 0.03)
        profile.append((value, log_variance, log_temperature))
    _, log_variance, log_temperature = min(profile)  # the first of tied minima
    i = log_variances.index(log_variance)
    log_variance = minimise_bracketed(lambda v: objective_at(v)(log_temperature), log_variances[max(i - 1, 0):i + 2],
                                      0.05)[0]
    return laplace.with_hyperparameters(prior_precision=math.exp(-log_variance), temperature=math.exp(log_temperature))


def tune_laplace_marglik(laplace: KFACLaplace, prior_precisions: Optional[Sequence[float]] = None) -> KFACLaplace:
    """Copy of ``laplace`` with the prior precision ``tau`` that maximises the Laplace marginal likelihood (the
    evidence, MacKay 1992; Immer et al. 2021) post hoc at the fixed MAP, temperature unchanged: no validation labels.

    For the damped Kronecker posterior precision ``P = (sqrt(N) G + sqrt(tau) I_c) (x) (sqrt(N) A + sqrt(tau) I_{p+1})``
    and the MAP ``W~`` (c, p+1), ``d = c (p+1)``, the terms of ``log p(D)`` that depend on ``tau`` are

        log Z(tau) = -tau/2 ||W~||_F^2 + d/2 log tau - 1/2 [(p+1) sum_i log(sqrt(N) g_i + sqrt(tau))
                                                         + c sum_j log(sqrt(N) a_j + sqrt(tau))]

    (``g_i``, ``a_j`` the eigenvalues of ``G``, ``A``; ``log p(D | W~)`` does not depend on ``tau``). Maximised over
    ``prior_precisions`` (default: 10^-4 .. 10^4, 81 points log-spaced), all at once.
    Copy it with :class:`KFACLaplace`.
    """
    grid = torch.logspace(-4, 4, 81, dtype=torch.float64) if prior_precisions is None else \
        torch.tensor(list(prior_precisions), dtype=torch.float64)  # (G,)
    eig_A, eig_G = laplace.eigen[0].clamp(min=0).cpu(), laplace.eigen[2].clamp(min=0).cpu()  # (p+1,), (c,)
    n_classes, width = eig_G.shape[0], eig_A.shape[0]
    root_n, root_tau = math.sqrt(laplace.n), grid.sqrt()[:, None]  # (G, 1)
    log_det = width * torch.log(root_n * eig_G + root_tau).sum(1) + n_classes * torch.log(root_n * eig_A + root_tau).sum(1)
    squared_norm = float(laplace.weight.double().square().sum())
    log_evidence = -grid / 2 * squared_norm + n_classes * width / 2 * grid.log() - log_det / 2  # (G,)
    return laplace.with_hyperparameters(prior_precision=float(grid[int(log_evidence.argmax())]))


def cross_fitted_laplace_predict(laplace: KFACLaplace, features: Tensor, n_folds: int = 5, n_samples: int = 50,
                                 generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """The Laplace predictive of the inputs the posterior was fit on, each from a curvature fit without its fold.

    Fold ``k`` holds the inputs ``n`` with ``n mod K = k``; its predictive comes from ``A``, ``G`` refit on the other
    folds, with ``laplace``'s MAP ``W~``, prior precision and temperature. Only the curvature leaves the fold out:
    the MAP head was trained on every input, so this is not an unseen input's predictive. Returns the MC predictive
    (N, c) and :meth:`KFACLaplace.logit_std` (N,). Shapes: ``features`` (N, p), ``N >= 2 K``.
    Copy it with :class:`KFACLaplace`.
    """
    width = features.shape[1]
    weight, bias = laplace.weight[:, :width], laplace.weight[:, width] if laplace.has_bias else None
    fold = torch.arange(features.shape[0], device=features.device) % n_folds  # (N,)
    probs = torch.empty(features.shape[0], weight.shape[0], dtype=features.dtype, device=features.device)  # (N, c)
    logit_std = torch.empty(features.shape[0], dtype=torch.float64, device=features.device)  # (N,)
    for k in range(n_folds):  # K fits of two matrix products each
        held_out = fold == k
        fold_laplace = KFACLaplace.fit(features[~held_out], weight, bias, laplace.prior_precision,
                                       laplace.temperature)
        probs[held_out] = fold_laplace.predict(features[held_out], n_samples, generator=generator)
        logit_std[held_out] = fold_laplace.logit_std(features[held_out])
    return probs, logit_std


# ══════════════════════════════════════════════════════════════════════════════
#  3. Model-internal ensemble and budgeted early exit
# ══════════════════════════════════════════════════════════════════════════════


def mie_ensemble(probs: Tensor, flops: Tensor) -> Tensor:
    """Model-internal ensemble: ``p_k^ens = sum_{m<=k} w_m p_m / sum_{m<=k} w_m`` with ``w_m`` = cumulative FLOPs.

    Later (costlier, usually better) exits weigh more. Meronen et al. (2024), section 3.3, eq. (6).
    Shapes: ``probs`` (K, N, c), ``flops`` (K,) -> (K, N, c).
    """
    flops = torch.as_tensor(flops, dtype=probs.dtype, device=probs.device)
    if probs.dim() != 3 or flops.shape != probs.shape[:1]:
        raise ValueError(f"mie_ensemble: probs (K, N, c) and flops (K,) expected, got {tuple(probs.shape)} "
                         f"and {tuple(flops.shape)}")
    weighted = torch.cumsum(flops[:, None, None] * probs, dim=0)  # (K, N, c)
    return weighted / torch.cumsum(flops, dim=0)[:, None, None]


def tune_laplace_ensemble(laplaces: Sequence[KFACLaplace], features_val: Sequence[Tensor], y_val: Tensor,
                          flops: Sequence[float], n_samples: int = 50, link: str = "mc",
                          generator: Optional[torch.Generator] = None) -> list[KFACLaplace]:
    """Greedy exit-by-exit tuning for the model-internal ensemble: exit ``k``'s ``(T, sigma^2)`` minimises the
    validation NLL of the FLOPs-weighted ensemble of exits ``<= k``, earlier exits fixed.

    ``argmin -(1/N) sum_n log [(sum_{m<k} w_m p_m + w_k p_k(T, sigma^2)) / sum_{m<=k} w_m]_{y_n}`` by :func:`tune_laplace`,
    whose draws exit ``k``'s fixed predictive replays. Meronen et al. (2024), section 3.3 ("MIE + Laplace").
    Shapes: ``features_val[k]`` (N, p_k), ``flops`` (K,).
    Copy it with :class:`KFACLaplace`, :func:`tune_laplace`, :func:`nlpd` and :func:`minimise_bracketed`.
    """
    if not len(laplaces) == len(features_val) == len(flops):
        raise ValueError(f"laplaces, features_val and flops must have the same length K, got "
                         f"{len(laplaces)}, {len(features_val)}, {len(flops)}")
    if generator is None:  # a private stream, so that each exit's predictive can replay its search's draws
        generator = torch.Generator(device=features_val[0].device).manual_seed(int(torch.randint(2 ** 62, (1,))))
    tuned: list[KFACLaplace] = []
    weighted_sum, weight_total = 0.0, 0.0  # running sum_m w_m p_m over the exits already fixed
    for laplace, features, exit_flops in zip(laplaces, features_val, flops):
        def ensemble_nll(probs: Tensor) -> float:
            return nlpd((weighted_sum + exit_flops * probs) / (weight_total + exit_flops), y_val)

        start = generator.get_state()
        best = tune_laplace(laplace, features, y_val, n_samples, link, generator, ensemble_nll)
        generator.set_state(start)
        probs = best.predict(features, n_samples, link, generator)  # (N, c): the search's draws
        tuned.append(best)
        weighted_sum, weight_total = weighted_sum + exit_flops * probs, weight_total + exit_flops
    return tuned


def budget_thresholds(confidences_val: Tensor, level: float) -> Tensor:
    """Per-exit confidence thresholds that make exit ``k`` take a share ``pi_k ∝ level^k`` of the validation set.

    Walk the exits in order: among the samples still present, ``threshold_k`` is the confidence of the
    ``floor(N pi_k)``-th most confident (``+inf`` when none may exit), and every sample at or above it exits (ties
    exit together); the last exit takes the rest (``-inf``). Huang et al. (ICLR 2018), MSDNet budgeted
    classification; Meronen et al. (2024), section 4. Shapes: ``confidences_val`` (K, N) -> (K,).
    """
    if confidences_val.dim() != 2:
        raise ValueError(f"budget_thresholds: confidences_val must be (K, N), got {tuple(confidences_val.shape)}")
    n_exits, n = confidences_val.shape
    shares = torch.tensor([level ** (k + 1) for k in range(n_exits)], dtype=torch.float64)
    quotas = torch.floor(n * shares / shares.sum()).long().tolist()  # K numbers: a loop over exits only
    thresholds = torch.full((n_exits,), math.inf, dtype=confidences_val.dtype, device=confidences_val.device)
    present = torch.ones(n, dtype=torch.bool, device=confidences_val.device)  # (N,)
    for k in range(n_exits - 1):
        candidates = confidences_val[k][present]  # (M,)
        if quotas[k] >= 1 and candidates.numel() > 0:
            thresholds[k] = candidates.topk(min(quotas[k], candidates.numel())).values[-1]
            present &= confidences_val[k] < thresholds[k]
    thresholds[-1] = -math.inf
    return thresholds


def early_exit(probs: Tensor, thresholds: Tensor) -> tuple[Tensor, Tensor]:
    """Budgeted early exit: each input leaves at the first exit ``k`` with ``max_c p_k >= threshold_k``.

    The last exit takes everything that is left. Meronen et al. (2024), section 4.
    Shapes: ``probs`` (K, N, c), ``thresholds`` (K,) -> ``exit_index`` (N,) int64, ``probs`` (N, c).
    """
    if probs.dim() != 3 or thresholds.shape != probs.shape[:1]:
        raise ValueError(f"early_exit: probs (K, N, c) and thresholds (K,) expected, got {tuple(probs.shape)} "
                         f"and {tuple(thresholds.shape)}")
    confidence = probs.max(dim=-1).values  # (K, N)
    leaves = confidence >= thresholds.to(confidence.dtype)[:, None]  # (K, N)
    leaves[-1] = True
    exit_index = leaves.int().argmax(dim=0)  # (N,): argmax returns the first maximum
    return exit_index, probs[exit_index, torch.arange(probs.shape[1], device=probs.device)]


# ══════════════════════════════════════════════════════════════════════════════
#  4. Nested prediction sets: AVCS and split conformal
# ══════════════════════════════════════════════════════════════════════════════
# Jazbec et al. (UAI 2024): C_t = {y : R_t(y) <= 1/alpha}, R_t(y) = prod_{l<=t} p_l(y) / p(y | W_l), p_l exit l's
# predictive, W_l one posterior draw. Ville's inequality would cover y at every exit at once if R_t(y) were a
# martingale; it is not, even for a correct model: with the draw independent of the label (the authors' code and ours)
# E[p_l(y) / pi_l(y)] = p_l(y) E[1 / pi_l(y)] >= p_l(y) / E[pi_l(y)] = 1 (Jensen). The running intersection makes the
# sets nested; coverage is tuned on val. Split conformal covers >= 1 - alpha per exit for exchangeable data.


def log_gamma_variates(concentration: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """``log X`` with ``X ~ Gamma(concentration, 1)`` elementwise, float64, finite even for tiny concentrations.

    Marsaglia & Tsang (2000) for shape ``a + 1 >= 1``, then the boost ``X = Y U^(1/a)`` taken in log space:
    ``log X = log Y + log(U) / a`` never underflows; torch clamps a direct ``Gamma(1e-3)`` draw at the tiniest normal.
    Every concentration must be finite and > 0 (a NaN or one below -2/3 would never pass the rejection step)."""
    if not bool(((concentration > 0) & torch.isfinite(concentration)).all()):
        raise ValueError("log_gamma_variates: every concentration must be finite and > 0")
    shape = concentration.double() + 1.0
    d = shape - 1.0 / 3.0
    c = torch.rsqrt(9.0 * d)
    log_y = torch.zeros_like(shape)
    pending = torch.ones_like(shape, dtype=torch.bool)
    while bool(pending.any()):  # acceptance >= 95% per round: a handful of rounds
        x = torch.randn(shape.shape, generator=generator, dtype=shape.dtype, device=shape.device)
        log_u = torch.log1p(-torch.rand(shape.shape, generator=generator, dtype=shape.dtype, device=shape.device))
        v = (1.0 + c * x) ** 3
        log_v = torch.log(v.clamp(min=1e-300))
        accept = pending & (v > 0) & (log_u < 0.5 * x * x + d - d * v + d * log_v)
        log_y = torch.where(accept, torch.log(d) + log_v, log_y)
        pending &= ~accept
    log_boost = torch.log1p(-torch.rand(shape.shape, generator=generator, dtype=shape.dtype, device=shape.device))
    return log_y + log_boost / concentration.double()


def nested_sets(log_ratios: Tensor, alpha: float = 0.05, intersect: bool = True) -> Tensor:
    """Sets from per-exit log likelihood ratios by Ville's inequality: ``C_t = {k : sum_{l<=t} log r_l(k) <=
    log(1/alpha)}``, with ``intersect`` the running intersection ``C_t ∩ C_{t-1} ∩ ...`` (nested by construction).
    Jazbec et al. (UAI 2024), eq. (5). Shapes: ``log_ratios`` (K, N, c) -> bool (K, N, c)."""
    sets = torch.cumsum(log_ratios, dim=0) <= -math.log(alpha)  # (K, N, c)
    if intersect:
        sets = torch.cumprod(sets.to(torch.uint8), dim=0).bool()
    return sets


def dirichlet_log_ratios(logits: Tensor, thresholds: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """The Dirichlet AVCS log ratios of every exit: ``log r_t(k) = log p_t(k) - log pi_t(k)`` on the thresholded
    support, ``+inf`` off it (see :func:`avcs_sets`; Gamma draws from :func:`log_gamma_variates`).
    Shapes: ``logits`` (K, N, c), ``thresholds`` (K,) -> (K, N, c) float64."""
    if logits.dim() != 3 or thresholds.shape != logits.shape[:1]:
        raise ValueError(f"logits (K, N, c) and thresholds (K,) expected, got {tuple(logits.shape)} and "
                         f"{tuple(thresholds.shape)}")
    z = logits.double()
    support = (z >= thresholds.double()[:, None, None]) & (z > 0)  # (K, N, c)
    concentration = torch.where(support, z, torch.zeros_like(z))  # (K, N, c)
    log_p = torch.log(concentration) - torch.log(concentration.sum(-1, keepdim=True).clamp(min=1e-300))
    log_gamma = log_gamma_variates(torch.where(support, z, torch.ones_like(z)), generator)  # (K, N, c)
    log_gamma = torch.where(support, log_gamma, torch.full_like(log_gamma, -math.inf))
    log_pi = log_gamma - torch.logsumexp(log_gamma, dim=-1, keepdim=True)  # Dirichlet draw, in log space
    return torch.where(support, log_p - log_pi, torch.full_like(z, math.inf))


def avcs_sets(logits: Tensor, thresholds: Tensor, alpha: float = 0.05, intersect: bool = True,
              generator: Optional[torch.Generator] = None) -> Tensor:
    """Anytime-valid prediction sets of an early-exit classifier from its exit logits (Dirichlet AVCS).

    Per exit ``t``: ``a_t,k = z_t,k`` if ``z_t,k >= tau_t`` and ``z_t,k > 0`` else 0, support ``S_t = {a > 0}``,
    ``p_t(k) = a_t,k / sum_j a_t,j``, one draw ``pi_t ~ Dir(a_t on S_t)``, ratio ``r_t(k) = p_t(k) / pi_t(k)``
    (``+inf`` off ``S_t``), ``R_t = prod_{l<=t} r_l`` and ``C_t = {k : R_t(k) <= 1/alpha}``; empty support gives an
    empty set. ``intersect=True`` returns the running intersection, nested by construction. No coverage guarantee:
    ``E[r_t(k)] >= 1`` (see the section's header); tune on validation, measure on test.
    Jazbec et al. (UAI 2024), section 4.2, eq. (9)-(10). Shapes: ``logits`` (K, N, c), ``thresholds`` (K,)
    -> bool (K, N, c). Copy it with :func:`dirichlet_log_ratios`, :func:`log_gamma_variates`, :func:`nested_sets`.
    """
    return nested_sets(dirichlet_log_ratios(logits, thresholds, generator), alpha, intersect)


def tune_avcs(logits: Tensor, y: Tensor, alpha: float = 0.05, setting: str = "threshold", step: float = 0.5,
              generator: Optional[torch.Generator] = None, intersect: bool = True, largest: float = 64.0) -> Tensor:
    """Per-exit settings (K,) of :func:`avcs_sets` tuned on a calibration split, exit by exit, earlier exits fixed.

    ``setting="threshold"`` (the authors' tuning; Jazbec et al., UAI 2024, appendix, whose notebook tunes on test):
    ``tau_t`` rises from 1 by ``step`` while the coverage stays ``>= 1 - alpha`` at every exit; the step that broke
    it is undone. Sets ``avcs_sets(logits, tau)``.
    ``setting="offset"``: a constant ``b_t`` added to an exit's logits changes none of its predictions but widens
    its support ``{z + b >= 1}``; as ``b`` grows every ratio nears 1 and the set nears every label. ``b_t`` rises
    from 0 by ``step`` until exits ``<= t`` cover ``>= 1 - alpha`` (at most ``largest``). Sets
    ``avcs_sets(logits + b[:, None, None], ones)``. Every evaluation replays the same random stream, so an
    identically seeded generator reproduces the tuned coverage. Shapes: ``logits`` (K, N, c), ``y`` (N,) -> (K,).
    Copy it with :func:`avcs_sets`.
    """
    if not step > 0 or setting not in ("threshold", "offset"):  # a walk that would never end, or no walk
        raise ValueError(f"step must be > 0 and setting 'threshold' or 'offset', got {step} and {setting!r}")
    if logits.dim() != 3 or y.shape != logits.shape[1:2]:
        raise ValueError(f"logits (K, N, c) and y (N,) expected, got {tuple(logits.shape)} and {tuple(y.shape)}")
    if generator is None:
        generator = torch.Generator(device=logits.device).manual_seed(int(torch.randint(2 ** 62, (1,))))
    start_state, thresholds = generator.get_state(), setting == "threshold"
    labels = y[None, :, None].expand(logits.shape[0], -1, 1)  # (K, N, 1)
    values = torch.full((logits.shape[0],), 1.0 if thresholds else 0.0, dtype=torch.float64, device=logits.device)

    def covers(exits: int) -> bool:  # coverage >= 1 - alpha at exits 0 .. exits - 1
        generator.set_state(start_state)
        shifted = logits.double() if thresholds else logits.double() + values[:, None, None]  # (K, N, c)
        sets = avcs_sets(shifted, values if thresholds else torch.ones_like(values), alpha, intersect, generator)
        return bool((sets.gather(-1, labels).squeeze(-1).double().mean(-1)[:exits] >= 1.0 - alpha).all())

    ceiling = float(logits.max()) + step  # above every logit every set is empty: the threshold walk stops there
    for t in range(logits.shape[0]):
        if thresholds:
            while float(values[t]) < ceiling:
                values[t] += step
                if not covers(logits.shape[0]):
                    values[t] -= step
                    break
        else:
            while float(values[t]) < largest and not covers(t + 1):
                values[t] += step
    generator.set_state(start_state)
    return values


def laplace_avcs_sets(laplaces: Sequence[KFACLaplace], features: Sequence[Tensor], alpha: float = 0.05,
                      n_samples: int = 50, intersect: bool = True,
                      generator: Optional[torch.Generator] = None) -> Tensor:
    """AVCS sets from the Laplace posterior of every exit (the general form of the AVCS ratio).

    ``R_t(y) = prod_{l<=t} p_l(y | x, D) / p(y | x, W_l)``, ``C_t = {y : R_t(y) <= 1/alpha}``: numerator the
    Laplace MC predictive of exit ``l``, denominator ``softmax(z_l / T)`` of one posterior draw per input and exit,
    ``z_l = mean + sqrt(phi~^T V phi~) L g``, ``L = cholesky(U)``, ``g ~ N(0, I_c)``. A posterior tight against the
    logit gaps puts the draw near the mean, so ``R_t ~= 1 <= 1/alpha`` for every label: the set keeps them all. Both
    terms are float64 log-probabilities, so a label far below the top can be excluded. No coverage guarantee (the
    section's header). Jazbec et al. (UAI 2024), eq. (5). ``features[k]`` is (N, p_k) -> bool (K, N, c).
    Copy it with :class:`KFACLaplace` and :func:`nested_sets`.
    """
    if len(laplaces) != len(features) or not laplaces:
        raise ValueError(f"laplaces and features must be non-empty lists of the same length, got "
                         f"{len(laplaces)} and {len(features)}")
    log_ratios = []
    for laplace, exit_features in zip(laplaces, features):
        # float64 and log space throughout: a float32 probability underflows below ~1e-45, and every label
        # below that would share one log-ratio, so none could be excluded
        features64 = exit_features.double()  # (N, p)
        log_predictive = laplace.predict(features64, n_samples, "mc", generator, log=True)  # (N, c)
        mean, scale = laplace.logit_distribution(features64)  # (N, c), (N,)
        cholesky = torch.linalg.cholesky(laplace.factor("U"))  # (c, c)
        normal = torch.randn(mean.shape, generator=generator, dtype=torch.float64, device=mean.device)  # (N, c)
        draw = mean + scale.sqrt()[:, None] * (normal @ cholesky.T)  # (N, c): one posterior draw per input
        log_likelihood = torch.log_softmax(draw / laplace.temperature, dim=-1)  # (N, c)
        log_ratios.append(log_predictive - log_likelihood)
    if len({ratio.shape for ratio in log_ratios}) != 1:
        raise ValueError(f"every exit must give the same (N, c), got {[tuple(r.shape) for r in log_ratios]}")
    return nested_sets(torch.stack(log_ratios), alpha, intersect)


def conformal_sets(probs_val: Tensor, y_val: Tensor, probs: Tensor, alpha: float = 0.05,
                   intersect: bool = False) -> Tensor:
    """Split conformal prediction sets of every exit with the LAC score ``s(x, y) = 1 - p(y | x)``.

    Exit ``t``: ``q_t`` = the ``ceil((n + 1)(1 - alpha))``-th smallest of the ``n`` calibration scores
    ``1 - p_t(y_i | x_i)`` (``+inf`` when that rank exceeds ``n``), ``C_t(x) = {y : 1 - p_t(y | x) <= q_t}``. If
    calibration and test pairs are exchangeable, the test score is equally likely to take any rank among the
    ``n + 1``, so ``P(y in C_t) >= 1 - alpha`` at each exit. ``intersect=True`` returns the running intersection,
    nested by construction; it misses ``y`` when any exit ``<= t`` does, so it covers ``>= 1 - (t + 1) alpha`` (the
    union bound). Vovk, Gammerman & Shafer (2005); Sadinle, Lei & Wasserman (JASA 2019), LAC.
    Shapes: ``probs_val`` (K, n, c), ``y_val`` (n,), ``probs`` (K, N, c) -> bool (K, N, c).
    """
    if probs_val.dim() != 3 or y_val.shape != probs_val.shape[1:2] or probs.shape[::2] != probs_val.shape[::2]:
        raise ValueError(f"probs_val (K, n, c), y_val (n,) and probs (K, N, c) expected, got "
                         f"{tuple(probs_val.shape)}, {tuple(y_val.shape)} and {tuple(probs.shape)}")
    n = y_val.shape[0]
    scores = 1.0 - probs_val.gather(-1, y_val[None, :, None].expand(probs_val.shape[0], -1, 1)).squeeze(-1)  # (K, n)
    rank = math.ceil((n + 1) * (1.0 - alpha))
    quantiles = torch.sort(scores, dim=-1).values[:, rank - 1] if rank <= n else \
        torch.full(scores.shape[:1], math.inf, dtype=scores.dtype, device=scores.device)  # (K,)
    sets = 1.0 - probs <= quantiles[:, None, None]  # (K, N, c)
    return torch.cumprod(sets.to(torch.uint8), dim=0).bool() if intersect else sets


def set_metrics(sets: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Size, coverage and nestedness of prediction sets per exit.

    ``size(t) = mean_n |C_t|``, ``coverage(t) = mean_n [y_n in C_t]``, ``nestedness(t) = mean_n
    |∩_{s<=t} C_s| / |C_t|`` (1 when both are empty). Jazbec et al. (UAI 2024), section 5.
    Shapes: ``sets`` bool (K, N, c), ``y`` (N,) -> dict of (K,) tensors.
    """
    if sets.dim() != 3 or y.shape != sets.shape[1:2]:
        raise ValueError(f"set_metrics: sets (K, N, c) and y (N,) expected, got {tuple(sets.shape)} and {tuple(y.shape)}")
    sizes = sets.sum(-1).double()  # (K, N)
    covered = sets.gather(-1, y[None, :, None].expand(sets.shape[0], -1, 1)).squeeze(-1).double()  # (K, N)
    intersection_sizes = torch.cumprod(sets.to(torch.uint8), dim=0).sum(-1).double()  # (K, N)
    nested = torch.where(sizes > 0, intersection_sizes / sizes.clamp(min=1), torch.ones_like(sizes))  # (K, N)
    return {"size": sizes.mean(-1), "coverage": covered.mean(-1), "nestedness": nested.mean(-1)}


# ══════════════════════════════════════════════════════════════════════════════
#  5. Metrics
# ══════════════════════════════════════════════════════════════════════════════


def group_accuracies(pred: Tensor, y: Tensor, groups: Tensor, n_groups: int) -> Tensor:
    """Accuracy within each group: ``acc_g = mean_{n : g_n = g} [pred_n = y_n]``, NaN for an empty group.

    Sagawa et al. (ICLR 2020), section 2. Shapes: ``pred``, ``y``, ``groups`` (N,) -> (n_groups,) float64.
    """
    if not pred.shape == y.shape == groups.shape or pred.dim() != 1:
        raise ValueError(f"group_accuracies: pred, y and groups must all be (N,), got {tuple(pred.shape)}, "
                         f"{tuple(y.shape)}, {tuple(groups.shape)}")
    correct = torch.bincount(groups, weights=(pred == y).double(), minlength=n_groups)  # (G,)
    counts = torch.bincount(groups, minlength=n_groups).double()  # (G,)
    return torch.where(counts > 0, correct / counts.clamp(min=1), torch.full_like(counts, math.nan))


def worst_group_accuracy(pred: Tensor, y: Tensor, groups: Tensor, n_groups: int) -> float:
    """Worst-group accuracy ``min_g acc_g`` over the non-empty groups (not the smallest group's accuracy).

    Sagawa et al. (ICLR 2020), section 2. Shapes: ``pred``, ``y``, ``groups`` (N,).
    Copy it with :func:`group_accuracies`."""
    accuracies = group_accuracies(pred, y, groups, n_groups)
    return float(accuracies[~accuracies.isnan()].min())


def reliability_bins(probs: Tensor, y: Tensor, n_bins: int = 15) -> tuple[Tensor, Tensor, Tensor]:
    """Equal-width confidence bins ``(b/B, (b+1)/B]`` (0 in the first, exactly 1.0 in the last): per bin the count
    ``n_b``, the summed confidence and the number correct, each (B,) float64. Confidence = max probability.
    Guo et al. (ICML 2017), section 2 (reliability diagrams). Shapes: ``probs`` (N, c), ``y`` (N,)."""
    if probs.dim() != 2 or y.shape != probs.shape[:1]:
        raise ValueError(f"probs (N, c) and y (N,) expected, got {tuple(probs.shape)} and {tuple(y.shape)}")
    confidence, pred = probs.double().max(dim=-1)  # (N,), (N,)
    inner_edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64, device=probs.device)[1:-1]  # (B-1,)
    bins = torch.bucketize(confidence, inner_edges, right=False)  # (N,): edges[b-1] < conf <= edges[b]
    counts = torch.bincount(bins, minlength=n_bins).double()  # (B,)
    confidence_sums = torch.bincount(bins, weights=confidence, minlength=n_bins)  # (B,)
    correct_sums = torch.bincount(bins, weights=(pred == y).double(), minlength=n_bins)  # (B,)
    return counts, confidence_sums, correct_sums


def expected_calibration_error(probs: Tensor, y: Tensor, n_bins: int = 15) -> float:
    """ECE with equal-width confidence bins: ``sum_b (n_b / N) |acc_b - conf_b| = sum_b |correct_b - conf_sum_b| / N``.

    Bins of :func:`reliability_bins` (a confidence of exactly 1.0 counts, in the last bin).
    Guo et al. (ICML 2017), *On Calibration of Modern Neural Networks*, eq. (3). Shapes: ``probs`` (N, c), ``y`` (N,).
    """
    _, confidence_sums, correct_sums = reliability_bins(probs, y, n_bins)
    return float((correct_sums - confidence_sums).abs().sum() / probs.shape[0])


def auroc(scores_in: Tensor, scores_out: Tensor) -> float:
    """Area under the ROC curve of telling in-distribution inputs (``scores_in``, higher = more in-distribution) from
    others (``scores_out``): ``P(s_in > s_out) + P(s_in = s_out) / 2`` over all pairs, by the Mann-Whitney rank sum
    ``(R_in - n_in (n_in + 1) / 2) / (n_in n_out)``, ``R_in`` the sum of the in-distribution scores' ranks in the
    pooled sample (tied scores share their mean rank). Hendrycks & Gimpel (ICLR 2017), the max-probability baseline.
    Shapes: ``scores_in`` (n_in,), ``scores_out`` (n_out,)."""
    pooled = torch.cat([scores_in.double().flatten(), scores_out.double().flatten()])  # (n_in + n_out,)
    _, inverse, counts = torch.unique(pooled, return_inverse=True, return_counts=True)  # sorted distinct values
    mid_ranks = torch.cumsum(counts, 0).double() - (counts.double() - 1.0) / 2.0  # (U,): mean rank of each value
    n_in, n_out = scores_in.numel(), scores_out.numel()
    rank_sum = float(mid_ranks[inverse[:n_in]].sum())
    return (rank_sum - n_in * (n_in + 1) / 2.0) / (n_in * n_out)


# ══════════════════════════════════════════════════════════════════════════════
#  6. Networks: early-exit networks
# ══════════════════════════════════════════════════════════════════════════════
# A backbone exposes its stages as lists of its own modules (so its parameter names stay torchvision's) and its
# classifier ``fc``. EarlyExitNet puts one exit head after each stage; the last is the backbone's own pool + fc.


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True)]


class ExitHead(nn.Module):
    """An exit: ``body`` (a conv block, or nothing), global average pool, then ``linear``; ``features(h)`` (N, p),
    the input of ``linear``, is what the last-layer Laplace works on."""

    def __init__(self, body: nn.Module, linear: nn.Linear) -> None:
        super().__init__()
        self.body, self.linear = body, linear

    def features(self, h: Tensor) -> Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.body(h), 1), 1)  # (N, p)

    def forward(self, h: Tensor) -> Tensor:
        return self.linear(self.features(h))  # (N, c)


def readout_head(in_channels: int, width: int, n_classes: int) -> ExitHead:
    """DEDIER's early readout: conv3x3 -> BN -> ReLU -> conv3x3 -> BN -> ReLU -> pool -> linear.
    Tiwari et al. (WACV 2024), section 4 (64 -> 128 channels after a ResNet-18's layer1)."""
    body = nn.Sequential(*_conv_bn_relu(in_channels, width), *_conv_bn_relu(width, width))
    return ExitHead(body, nn.Linear(width, n_classes))


class SmallCNN(nn.Module):
    """A small VGG-style CNN for 32x32 inputs: three stages of two conv-BN-ReLU at width w, 2w, 4w, each
    opening with a stride-2 conv (the first too, to keep a full teacher + student run CPU-friendly)."""

    def __init__(self, n_classes: int, width: int = 32) -> None:
        super().__init__()
        self.stage_channels = [width, 2 * width, 4 * width]
        self.stages = nn.ModuleList([nn.Sequential(*_conv_bn_relu(c_in, c, 2), *_conv_bn_relu(c, c))
                                     for c_in, c in zip([3, width, 2 * width], self.stage_channels)])
        self.fc = nn.Linear(4 * width, n_classes)

    def stage_modules(self) -> list[list[nn.Module]]:
        return [[stage] for stage in self.stages]


class EarlyExitNet(nn.Module):
    """A backbone cut into stages with one exit head after each; the last exit is the backbone's classifier.
    ``forward(x)`` -> K logits (N, c), first exit first; ``forward_features(x)`` -> K features (N, p_k), the
    inputs of each head's ``linear``. ``detach_exits=True`` (DEDIER's readouts, the default) feeds the early heads
    detached stage outputs, so they never push gradients into the backbone; ``False`` trains the exits jointly.
    ``exit_flops[k]``: multiply-adds of one input up to and including exit k (earlier heads included)."""

    def __init__(self, backbone: nn.Module, early_heads: Sequence[ExitHead], input_size: int,
                 detach_exits: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleList([*early_heads, ExitHead(nn.Identity(), backbone.fc)])  # the last: the backbone's fc
        if len(self.heads) != len(backbone.stage_modules()):
            raise ValueError(f"{len(early_heads)} early heads for {len(backbone.stage_modules())} stages: "
                             "one head per stage but the last is expected")
        self.detach_exits, self.input_size = detach_exits, input_size
        self.stage_flops, self.head_flops = self._count_flops()
        self.exit_flops = [self.pass_flops(range(k + 1)) for k in range(len(self.heads))]

    def forward_features(self, x: Tensor, exits: Optional[Sequence[int]] = None,
                         float32_heads: bool = False) -> list[Tensor]:
        """Features (N, p_k) of every exit, or of ``exits`` only (stages past the last one asked for are skipped).
        ``float32_heads=True`` runs the heads in float32 even under bf16 autocast (the backbone stays bf16), so that
        calibration figures, Laplace fits and sets do not read bf16's 3 significant digits."""
        last = len(self.heads) - 1
        wanted = self._exit_set(exits)
        features, h = {}, x
        for k, modules in enumerate(self.backbone.stage_modules()[:max(wanted) + 1]):
            for module in modules:
                h = module(h)
            if k in wanted:
                head_input = h.detach() if self.detach_exits and k < last else h
                if float32_heads:
                    with torch.autocast(x.device.type, enabled=False):
                        features[k] = self.heads[k].features(head_input.float())  # (N, p_k) float32
                else:
                    features[k] = self.heads[k].features(head_input)  # (N, p_k)
        return [features[k % (last + 1)] for k in (sorted(wanted) if exits is None else exits)]

    def forward(self, x: Tensor) -> list[Tensor]:
        return [head.linear(f) for head, f in zip(self.heads, self.forward_features(x))]  # K x (N, c)

    def pass_flops(self, exits: Optional[Sequence[int]] = None) -> int:
        """Multiply-adds of one input through the stages up to the last of ``exits`` and the heads of ``exits`` (a pass
        that reads their logits; default every exit). A training step costs about three forward passes."""
        wanted = self._exit_set(exits)
        return sum(self.stage_flops[:max(wanted) + 1]) + sum(self.head_flops[k] for k in wanted)

    def _exit_set(self, exits: Optional[Sequence[int]]) -> set[int]:
        """The exits asked for as non-negative indices (``-1`` is the last), every exit for None."""
        n_exits = len(self.heads)
        return set(range(n_exits)) if exits is None else {k % n_exits for k in exits}

    def _count_flops(self) -> tuple[list[int], list[int]]:
        """Multiply-adds of one input per stage and per head, from forward hooks on every conv and linear layer."""
        macs: dict[nn.Module, int] = {}

        def count(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            # output values x weights per output value (in/groups kh kw for a conv, in_features for a linear)
            macs[module] = output.numel() * module.weight[0].numel()

        hooks = [m.register_forward_hook(count) for m in self.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        self.eval()  # called from __init__ on a fresh network: the probe must leave BatchNorm's statistics alone
        with torch.no_grad():
            self(torch.zeros(1, 3, self.input_size, self.input_size, device=next(self.parameters()).device))
        self.train()
        for hook in hooks:
            hook.remove()

        def total(modules: Sequence[nn.Module]) -> int:
            return sum(macs.get(sub, 0) for module in modules for sub in module.modules())

        return ([int(total(modules)) for modules in self.backbone.stage_modules()],
                [int(total([head])) for head in self.heads])

# ══════════════════════════════════════════════════════════════════════════════
#  7. Data
# ══════════════════════════════════════════════════════════════════════════════
# Every dataset becomes three splits of uint8 images (N, 3, H, W) with labels and group ids. Images stay uint8
# until they reach the device: 4x less memory and bandwidth than float, and augmentation runs there in batch.


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
WATERBIRDS_TRAIN_GROUP_SHARES = (3498, 184, 56, 1057)  # g = 2 y + place; Sagawa et al. (2020), table 4
SYNTH_SHAPES = ("disk", "triangle", "square", "ring", "plus", "diamond", "inverted triangle", "horizontal bar",
                "vertical bar", "cross")  # the classes of make_synth, in order


@dataclass
class Split:
    """One split: uint8 ``images`` (N, 3, H, W) (in memory or a memmap view), ``labels`` and ``groups`` (N,) int64."""
    images: Tensor
    labels: Tensor
    groups: Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass
class SpuriousDataset:
    """Train / val / test splits with what a model and a report need to know about them."""
    name: str
    train: Split
    val: Split
    test: Split
    n_classes: int
    n_groups: int
    group_names: list[str]
    mean: tuple[float, float, float]  # normalisation, per RGB channel
    std: tuple[float, float, float]
    class_name: str  # what the label is
    spurious_name: str  # the attribute that groups are built from
    augment: str  # "none", "flip", "crop" (random resized crop + flip) or "pad" (pad-crop + flip)

    @property
    def image_size(self) -> int:
        return self.train.images.shape[-1]

    def accuracy(self, pred: Tensor, split: Split) -> dict:
        """Average, worst-group and per-group accuracy (None for an empty group) of ``pred`` (N,) on ``split``
        (Sagawa et al., ICLR 2020); on Waterbirds also the adjusted average ``sum_g n_g acc_g / sum_g n_g`` over the
        training group counts n_g (an empty group counts 0): WILDS' convention behind the literature's 97-98%."""
        accuracies = group_accuracies(pred, split.labels, split.groups, self.n_groups)  # (G,)
        report = {"avg_acc": float((pred == split.labels).double().mean()),
                  "worst_group_acc": worst_group_accuracy(pred, split.labels, split.groups, self.n_groups),
                  "group_acc": [None if math.isnan(a) else a for a in accuracies.tolist()]}
        if self.name == "waterbirds":
            counts = torch.bincount(self.train.groups, minlength=self.n_groups).double().to(accuracies.device)  # (G,)
            report["adjusted_avg_acc"] = float((torch.nan_to_num(accuracies) * counts).sum() / counts.sum())
        return report


def _smooth_noise(n: int, size: int, cells: int, generator: torch.Generator) -> Tensor:
    """Low-frequency noise (n, 1, size, size) in [-1, 1]: a random ``cells x cells`` grid, bilinearly upsampled."""
    coarse = torch.rand(n, 1, cells, cells, generator=generator) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def _shape_masks(rows: Tensor, cols: Tensor, centre_row: Tensor, centre_col: Tensor, half_width: Tensor,
                 n_classes: int) -> Tensor:
    """The first ``n_classes`` shapes of SYNTH_SHAPES at every image's centre and half-width r: bool (C, N, H, W).
    Their areas are comparable (1.4 r^2 for the bars to 2.2 r^2 for the ring; disk and triangle 1.8 r^2), so the
    outline, more than the amount of colour, tells the class."""
    dr, dc = (rows - centre_row) / half_width, (cols - centre_col) / half_width  # (N, H, 1), (N, 1, W): units of r
    radius = (dr ** 2 + dc ** 2).sqrt()
    depth = (rows - (centre_row - half_width)) / (1.8 * half_width)  # 0 at the apex, 1 at the base
    masks = [(rows - centre_row) ** 2 + (cols - centre_col) ** 2 <= (0.76 * half_width) ** 2,  # disk
             (depth >= 0) & (depth <= 1) & ((cols - centre_col).abs() <= depth * half_width)]  # triangle
    if n_classes > 2:
        masks += [(dr.abs() <= 0.7) & (dc.abs() <= 0.7),  # square
                  (radius >= 0.55) & (radius <= 1.0),  # ring
                  ((dr.abs() <= 0.28) & (dc.abs() <= 1.0)) | ((dc.abs() <= 0.28) & (dr.abs() <= 1.0)),  # plus
                  dr.abs() + dc.abs() <= 1.0,  # diamond
                  (1 - depth >= 0) & (1 - depth <= 1) & ((cols - centre_col).abs() <= (1 - depth) * half_width),
                  (dr.abs() <= 0.32) & (dc.abs() <= 1.1),  # horizontal bar
                  (dc.abs() <= 0.32) & (dr.abs() <= 1.1),  # vertical bar
                  ((dr.abs() - dc.abs()).abs() <= 0.3) & (radius <= 1.1)]  # cross (an X)
    return torch.stack([mask.expand(-1, rows.shape[1], cols.shape[2]) for mask in masks[:n_classes]])


def _render_synth(labels: Tensor, places: Tensor, size: int, generator: torch.Generator, n_classes: int = 2) -> Tensor:
    """uint8 (N, 3, size, size) images: shape ``labels`` of SYNTH_SHAPES, of random size, position and colour, on
    background ``places`` (N,): with two classes a textured brown-green land (0) or a blue water with waves (1),
    with more a textured colour of hue ``place / n_classes``; colour jitter per image, pixel noise on top."""
    n = labels.shape[0]
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    rows, cols = coords[None, :, None], coords[None, None, :]  # (1, H, 1), (1, 1, W)
    if n_classes == 2:
        land = torch.tensor([0.50, 0.45, 0.22])[:, None, None] + 0.10 * _smooth_noise(n, size, 4, generator)
        wave_phase = torch.rand(n, 1, 1, generator=generator) * 2 * math.pi
        waves = 0.08 * torch.sin(2 * math.pi * 5 * rows + wave_phase)  # (N, H, 1)
        water = (torch.tensor([0.20, 0.38, 0.68])[:, None, None] + waves[:, None]
                 + 0.04 * _smooth_noise(n, size, 4, generator))
        jitter = 0.08 * (torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1)  # per-image colour jitter
        background = torch.where(places[:, None, None, None].bool(), water, land) + jitter  # (N, 3, H, W)
    else:  # a colour wheel: the three channels are cosines of the hue, a third of a turn apart
        hue = places.float()[:, None] / n_classes + torch.tensor([0.0, 1 / 3, 2 / 3])  # (N, 3)
        colour = 0.45 + 0.25 * torch.cos(2 * math.pi * hue)  # (N, 3)
        jitter = 0.04 * (torch.rand(n, 3, generator=generator) * 2 - 1)  # per-image colour jitter
        background = (colour + jitter)[:, :, None, None] + 0.08 * _smooth_noise(n, size, 4, generator)  # (N, 3, H, W)

    half_width = 0.14 + 0.10 * torch.rand(n, 1, 1, generator=generator)  # r, as a fraction of the side
    centre_row = 0.25 + 0.5 * torch.rand(n, 1, 1, generator=generator)
    centre_col = 0.25 + 0.5 * torch.rand(n, 1, 1, generator=generator)
    n_shapes = max(n_classes, int(labels.max()) + 1)  # more than n_classes: shapes the classes never had
    masks = _shape_masks(rows, cols, centre_row, centre_col, half_width, n_shapes)  # (C', N, H, W)
    shape = masks[labels, torch.arange(n)]  # (N, H, W): each image's own class
    colour = 0.35 + 0.6 * torch.rand(n, 3, 1, 1, generator=generator)  # independent of class and place
    image = torch.where(shape[:, None], colour, background)
    image = image + 0.03 * torch.randn(image.shape, generator=generator)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def make_synth(n_train: int = 4800, n_val: int = 1200, n_test: int = 2400, image_size: int = 32,
               seed: int = 0, n_classes: int = 2) -> SpuriousDataset:
    """A Waterbirds-like spurious-correlation benchmark, generated in seconds, deterministic for ``seed``:
    ``n_classes`` (2 to 10) classes told apart by a foreground shape (SYNTH_SHAPES) on a background.

    Two classes: land or water, groups ``g = 2 y + place`` in Waterbirds' proportions (3498 : 184 : 56 : 1057), so
    95% of a class's training images show its own background (disk: land, triangle: water). More classes: one
    background colour per class, classes balanced, 90% of a class's training images on its own colour and the rest
    on another drawn uniformly; groups ``g = 2 y`` (own) and ``2 y + 1`` (another). In val and test each class's
    two groups are balanced (as in Waterbirds), so worst-group accuracy exposes a background shortcut, which a short
    ERM run learns (tested: majority groups above 90%, a minority below 50%)."""
    if min(n_train, n_val, n_test) < 4 * n_classes or image_size < 16 or not 2 <= n_classes <= len(SYNTH_SHAPES):
        raise ValueError(f"synth: every split needs >= {4 * n_classes} images, image_size >= 16 and 2 to "
                         f"{len(SYNTH_SHAPES)} classes, got n_train={n_train}, n_val={n_val}, n_test={n_test}, "
                         f"image_size={image_size}, n_classes={n_classes}")
    generator = torch.Generator().manual_seed(seed)
    if n_classes == 2:
        shares = torch.tensor(WATERBIRDS_TRAIN_GROUP_SHARES, dtype=torch.float64)
    else:  # group 2k: class k on its own background, 2k + 1: on another
        shares = torch.tensor([0.9, 0.1], dtype=torch.float64).repeat(n_classes)  # (2C,)
    # val/test: the training class balance, backgrounds balanced within each class
    balanced_shares = shares.view(n_classes, 2).sum(1).repeat_interleave(2) / 2  # (2C,)

    def group_counts(n: int, group_shares: Tensor) -> Tensor:  # (2C,): in proportion, at least one image a group
        return torch.floor(n * group_shares / group_shares.sum()).long().clamp(min=1)

    for name, n, group_shares in (("n_train", n_train, shares), ("n_val", n_val, balanced_shares),
                                  ("n_test", n_test, balanced_shares)):
        if int(group_counts(n, group_shares).sum()) > n:  # a group would be cut off: a class silently missing
            larger = next(m for m in range(n, 100 * n) if int(group_counts(m, group_shares).sum()) <= m)
            raise ValueError(f"synth: {name}={n} cannot hold one image of each of the {2 * n_classes} groups "
                             f"({n_classes} classes); the next size that can is {name}={larger}")

    def split(n: int, group_shares: Tensor) -> Split:
        counts = group_counts(n, group_shares)  # (2C,)
        counts[:int(n - counts.sum())] += 1  # the rounding remainder, one each, keeps val/test balanced
        groups = torch.repeat_interleave(torch.arange(2 * n_classes), counts)[torch.randperm(n, generator=generator)]
        labels, places = groups // 2, groups % 2
        if n_classes > 2:  # the background's colour: the class's own, or one of the others drawn uniformly
            offsets = torch.randint(1, n_classes, (n,), generator=generator)  # (N,)
            places = torch.where(places.bool(), (labels + offsets) % n_classes, labels)
        return Split(_render_synth(labels, places, image_size, generator, n_classes), labels, groups)

    return SpuriousDataset("synth", split(n_train, shares), split(n_val, balanced_shares),
                           split(n_test, balanced_shares), n_classes=n_classes, n_groups=2 * n_classes,
                           group_names=[f"{shape}/{place}" for shape in SYNTH_SHAPES[:n_classes] for place in
                                        (("land", "water") if n_classes == 2 else ("own", "other"))],
                           mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), class_name="shape",
                           spurious_name="background", augment="flip")


def make_synth_far_inputs(n: int, image_size: int = 32, n_classes: int = 2, seed: int = 0) -> dict[str, Tensor]:
    """Inputs unlike any :func:`make_synth` trains on, uint8 (n, 3, size, size) per kind, drawn uniformly (seeded):

        unseen shapes    shapes ``n_classes ..`` of SYNTH_SHAPES on the training backgrounds (``n_classes < 10``)
        unseen colours   the training shapes on background hues halfway between two classes' (``n_classes > 2``)"""
    generator = torch.Generator().manual_seed(seed)
    inputs = {}
    if n_classes < len(SYNTH_SHAPES):
        labels = torch.randint(n_classes, len(SYNTH_SHAPES), (n,), generator=generator)
        places = torch.randint(0, n_classes, (n,), generator=generator)  # land / water, or a class's colour
        inputs["unseen shapes"] = _render_synth(labels, places, image_size, generator, n_classes)
    if n_classes > 2:
        labels = torch.randint(0, n_classes, (n,), generator=generator)
        places = torch.randint(0, n_classes, (n,), generator=generator) + 0.5  # hue (k + 1/2) / C
        inputs["unseen colours"] = _render_synth(labels, places, image_size, generator, n_classes)
    return inputs


def _decode_image(path: Path, image_size: int, layout: str) -> np.ndarray:
    """One JPEG as uint8 (3, S, S) by the dataset's eval transform: ``layout="waterbirds"`` resizes to
    (256/224 S)^2 and centre-crops S (Sagawa et al.), ``"celeba"`` centre-crops 178^2 and resizes to S."""
    from PIL import Image  # Pillow is only needed for the JPEG datasets
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if layout == "waterbirds":
                resized = round(image_size * 256 / 224)
                image = image.resize((resized, resized), Image.BILINEAR)
                left = (resized - image_size) // 2
                image = image.crop((left, left, left + image_size, left + image_size))
            else:
                width, height = image.size
                side = min(178, width, height)
                left, top = (width - side) // 2, (height - side) // 2
                image = image.crop((left, top, left + side, top + side))
                image = image.resize((image_size, image_size), Image.BILINEAR)
            return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
    except OSError as error:
        raise ValueError(f"cannot decode image {path}: {error}") from None


def _cached_images(name: str, paths: list[Path], image_size: int, layout: str,
                   cache_dir: Optional[Union[str, Path]]) -> np.ndarray:
    """All ``paths`` decoded once into a uint8 memmap (N, 3, S, S) under the cache folder; later calls open it.
    Built in a temporary folder renamed into place once every image decoded, so an interrupted build never passes
    for a complete one; the key hashes the image paths and the size: another root or size gets its own cache."""
    key = hashlib.sha1(json.dumps([name, image_size, layout, [str(p) for p in paths]]).encode()).hexdigest()[:16]
    # default: $KDLAPLACE_CACHE, else $XDG_CACHE_HOME/kdlaplace, else ~/.cache/kdlaplace: never the data folder
    cache_dir = cache_dir or os.environ.get("KDLAPLACE_CACHE") or \
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kdlaplace"
    folder = Path(cache_dir) / f"{name}-{image_size}px-{key}"
    shape = (len(paths), 3, image_size, image_size)
    if not (folder / "images.u8").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            images = np.lib.format.open_memmap(building / "images.u8", mode="w+", dtype=np.uint8, shape=shape)

            def decode_into(index: int) -> None:
                images[index] = _decode_image(paths[index], image_size, layout)

            # Pillow releases the GIL while decoding and resizing, so threads use every core
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                list(pool.map(decode_into, range(len(paths))))
            images.flush()
            del images
            with contextlib.suppress(OSError):  # another process finished the same cache first
                os.replace(building, folder)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    # mode "c": copy-on-write, so torch.from_numpy gets a writable array without copying the file
    return np.load(folder / "images.u8", mmap_mode="c")


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: expected file {path} (see the README for the folder layout)")
    return path


def _require_columns(header: Sequence[str], required: Sequence[str], path: Path) -> None:
    missing = [column for column in required if column not in header]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; expected columns include "
                         f"{', '.join(required)}")


def _jpeg_dataset(name: str, paths: list[Path], split_ids: np.ndarray, labels: np.ndarray, attribute: np.ndarray,
                  listing: Path, image_size: int, cache_dir: Optional[Union[str, Path]], group_names: list[str],
                  class_name: str, spurious_name: str) -> SpuriousDataset:
    """A two-class JPEG dataset with ``g = 2 y + a``: images sorted by split id (0 train, 1 val, 2 test) and
    cached, so each split is a zero-copy view of the memmap."""
    missing = [path for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) listed in {listing} are missing, first: {missing[0]}")
    order = np.argsort(split_ids, kind="stable")
    images = _cached_images(name, [paths[i] for i in order], image_size, name, cache_dir)
    split_ids, labels, groups = split_ids[order], labels[order], 2 * labels[order] + attribute[order]
    starts, stops = np.searchsorted(split_ids, [0, 1, 2], "left"), np.searchsorted(split_ids, [0, 1, 2], "right")
    splits = [Split(torch.from_numpy(images[start:stop]), torch.from_numpy(labels[start:stop]).long(),
                    torch.from_numpy(groups[start:stop]).long()) for start, stop in zip(starts, stops)]
    return SpuriousDataset(name, *splits, n_classes=2, n_groups=4, group_names=group_names, mean=IMAGENET_MEAN,
                           std=IMAGENET_STD, class_name=class_name, spurious_name=spurious_name, augment="crop")


def _load_waterbirds(root: Path, image_size: int = 224, cache_dir: Optional[str] = None) -> SpuriousDataset:
    """Waterbirds as distributed by Sagawa et al. (2020) / WILDS: ``root/metadata.csv`` with columns
    ``img_id, img_filename, y, split, place, place_filename`` and the JPEGs at ``root/img_filename``."""
    metadata = _require_file(root / "metadata.csv", "waterbirds")
    with open(metadata, newline="") as handle:
        reader = csv.DictReader(handle)
        _require_columns(reader.fieldnames or [], ["img_filename", "y", "split", "place"], metadata)
        rows = list(reader)
    try:
        values = {column: np.array([int(row[column]) for row in rows]) for column in ("split", "y", "place")}
    except ValueError as error:
        raise ValueError(f"{metadata}: columns y, split and place must hold integers ({error})") from None
    for column, allowed in (("split", (0, 1, 2)), ("y", (0, 1)), ("place", (0, 1))):
        if not np.isin(values[column], allowed).all():
            raise ValueError(f"{metadata}: column {column} must hold values in {allowed}")
    paths = [root / row["img_filename"] for row in rows]
    return _jpeg_dataset("waterbirds", paths, values["split"], values["y"], values["place"], metadata, image_size,
                         cache_dir, ["landbird/land", "landbird/water", "waterbird/land", "waterbird/water"],
                         class_name="waterbird", spurious_name="water background")


def _find_first(root: Path, candidates: Sequence[str]) -> Optional[Path]:
    return next((root / name for name in candidates if (root / name).exists()), None)


def _read_celeba_table(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """(column names, image names, int values) of a CelebA annotation file: the original ``.txt`` (attributes:
    line 1 = count, line 2 = names; partition: no header) or Kaggle's ``.csv`` (header ``image_id,...``)."""
    if path.suffix == ".csv":
        with open(path, newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if not header or header[0] != "image_id":
                raise ValueError(f"{path}: expected a header line starting with 'image_id'")
            rows, columns = [row for row in reader if row], header[1:]
    else:
        rows = [line.split() for line in path.read_text().split("\n") if line.strip()]
        if rows and len(rows[0]) == 1 and rows[0][0].isdigit():  # list_attr_celeba.txt
            columns, rows = rows[1], rows[2:]
        else:  # list_eval_partition.txt
            columns = ["partition"]
    names, values = [row[0] for row in rows], [row[1:] for row in rows]
    try:
        table = np.array(values, dtype=np.int64)
    except ValueError:
        raise ValueError(f"{path}: every row must be an image name followed by {len(columns)} integers") from None
    if table.shape != (len(names), len(columns)):
        raise ValueError(f"{path}: every row must be an image name followed by {len(columns)} integers")
    return columns, names, table


def _load_celeba(root: Path, image_size: int = 224, cache_dir: Optional[str] = None,
                 target: str = "Blond_Hair", spurious: str = "Male") -> SpuriousDataset:
    """CelebA (Liu et al. 2015) in the original layout (``img_align_celeba/``, ``list_eval_partition.txt``,
    ``list_attr_celeba.txt``, possibly under ``Eval/`` and ``Anno/``) or Kaggle's (``.csv`` files, images in
    ``img_align_celeba/img_align_celeba/``). Target ``Blond_Hair``, spurious ``Male``: ``g = 2 blond + male``."""
    image_folder = _find_first(root, ["img_align_celeba/img_align_celeba", "img_align_celeba"])
    partition_file = _find_first(root, ["list_eval_partition.txt", "Eval/list_eval_partition.txt",
                                        "list_eval_partition.csv"])
    attribute_file = _find_first(root, ["list_attr_celeba.txt", "Anno/list_attr_celeba.txt", "list_attr_celeba.csv"])
    for found, what in ((image_folder, "img_align_celeba/"), (partition_file, "list_eval_partition.txt or .csv"),
                        (attribute_file, "list_attr_celeba.txt or .csv")):
        if found is None:
            raise FileNotFoundError(f"celeba: {root} has no {what} (see the README for the folder layout)")
    columns, names, attributes = _read_celeba_table(attribute_file)
    _require_columns(columns, [target, spurious], attribute_file)
    _, partition_names, partition = _read_celeba_table(partition_file)
    split_of = dict(zip(partition_names, partition[:, 0].tolist()))
    missing = [name for name in names if name not in split_of]
    if missing:
        raise ValueError(f"{partition_file}: no partition for image {missing[0]} listed in {attribute_file}")
    split_ids = np.array([split_of[name] for name in names])
    labels = (attributes[:, columns.index(target)] > 0).astype(np.int64)
    male = (attributes[:, columns.index(spurious)] > 0).astype(np.int64)
    paths = [image_folder / name for name in names]
    return _jpeg_dataset("celeba", paths, split_ids, labels, male, attribute_file, image_size, cache_dir,
                         ["non-blond/female", "non-blond/male", "blond/female", "blond/male"],
                         class_name=target, spurious_name=spurious)


def _unpickle(path: Path) -> dict:
    _require_file(path, "cifar100")
    try:
        with open(path, "rb") as handle:
            return pickle.load(handle, encoding="latin1")  # the files were pickled by Python 2
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise ValueError(f"{path}: not a CIFAR-100 pickle ({error})") from None


def _load_cifar100(root: Path, val_size: int = 5000, seed: int = 0) -> SpuriousDataset:
    """CIFAR-100 (Krizhevsky 2009) from ``root/{train,test,meta}`` (``data``: (N, 3072) uint8 in R, G, B planes);
    groups are the 20 superclasses; ``val_size`` training images are held out (seeded) for validation."""
    meta = _unpickle(root / "meta")

    def read(name: str) -> Split:
        path = root / name
        batch = _unpickle(path)
        for key in ("data", "fine_labels", "coarse_labels"):
            if key not in batch:
                raise ValueError(f"{path}: missing key '{key}'")
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(f"{path}: 'data' must be (N, 3072) uint8, got {data.shape}")
        images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
        return Split(images, torch.tensor(batch["fine_labels"]).long(), torch.tensor(batch["coarse_labels"]).long())

    train, test = read("train"), read("test")
    if not 0 < val_size < len(train):
        raise ValueError(f"cifar100: val_size must be in (0, {len(train)}), got {val_size}")
    permutation = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    val_rows, train_rows = permutation[:val_size].sort().values, permutation[val_size:].sort().values
    train_val = [Split(train.images[rows], train.labels[rows], train.groups[rows]) for rows in (train_rows, val_rows)]
    return SpuriousDataset(
        "cifar100", *train_val, test,
        n_classes=100, n_groups=20, group_names=list(meta.get("coarse_label_names", [str(g) for g in range(20)])),
        mean=CIFAR100_MEAN, std=CIFAR100_STD, class_name="fine label", spurious_name="superclass", augment="pad")


DATASETS = ("synth", "waterbirds", "celeba", "cifar100")
# Folders the distributions unpack to, tried inside the data root, and a file that marks each layout.
DATASET_FOLDERS = {
    "waterbirds": (["", "waterbird_complete95_forest2water2", "waterbirds_v1.0"], ["metadata.csv"]),
    "celeba": (["", "celeba", "celeba-dataset", "CelebA"],
               ["list_attr_celeba.txt", "Anno/list_attr_celeba.txt", "list_attr_celeba.csv"]),
    "cifar100": (["", "cifar-100-python"], ["meta"]),
}
DATASET_SOURCES = {
    "waterbirds": "the waterbird_complete95_forest2water2 tarball (Sagawa et al.'s group_DRO repository) or WILDS' "
                  "waterbirds_v1.0",
    "celeba": "the aligned & cropped CelebA images with list_eval_partition and list_attr_celeba (official page or "
              "Kaggle's celeba-dataset)",
    "cifar100": "the CIFAR-100 python version (cifar-100-python.tar.gz, Alex Krizhevsky's page)",
}


def default_data_root(name: str) -> Path:
    """Where dataset ``name`` lives when no root is given: ``$KDLAPLACE_DATA/<name>`` if set, else ``./data/<name>``."""
    return Path(os.environ.get("KDLAPLACE_DATA") or "data") / name


def resolve_data_root(name: str, root: Optional[Union[str, Path]] = None) -> Path:
    """The folder that holds dataset ``name`` in its distributed layout: ``root`` (default :func:`default_data_root`)
    or a folder the distribution unpacks to inside it (DATASET_FOLDERS); else one error that lists every place
    looked at and where to get the data."""
    base = Path(root).expanduser() if root is not None else default_data_root(name)
    subfolders, markers = DATASET_FOLDERS[name]
    candidates = [base / sub if sub else base for sub in subfolders]
    for folder in candidates:
        if any((folder / marker).is_file() for marker in markers):
            return folder
    looked = ", ".join(str(folder / markers[0]) for folder in candidates)
    how = "--data-root DIR" + ("" if root is not None else " or $KDLAPLACE_DATA")
    raise FileNotFoundError(f"{name}: no dataset found; looked for {looked}. Get {DATASET_SOURCES[name]}, unpack it "
                            f"there or point {how} at it (README, 'Real datasets')")


def load_dataset(name: str, root: Optional[Union[str, Path]] = None, **options) -> SpuriousDataset:
    """Load dataset ``name`` (one of DATASETS): ``synth`` generated (options: :func:`make_synth`'s), the others read
    from their distributed layout under ``root`` (:func:`resolve_data_root`; options: ``image_size``, ``cache_dir``
    for the JPEG datasets, ``val_size``, ``seed`` for CIFAR-100)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if name == "synth":
        return make_synth(**options)
    loader = {"waterbirds": _load_waterbirds, "celeba": _load_celeba, "cifar100": _load_cifar100}[name]
    return loader(resolve_data_root(name, root), **options)


def random_resized_crop_flip(images: Tensor, generator: torch.Generator, scale: tuple[float, float] = (0.7, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Tensor:
    """Batched random resized crop (area ``scale``, aspect ``ratio``; Szegedy et al. 2015) and horizontal flip by one
    ``grid_sample`` on the device: float (B, 3, H, W) -> (B, 3, H, W), random numbers from the CPU ``generator``."""
    n = images.shape[0]
    area = torch.empty(n).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    width = (area * log_ratio.exp()).sqrt().clamp(max=1.0)  # crop size as a fraction of the side
    height = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    shift = torch.rand(n, 2, generator=generator) * 2 - 1  # centre offset in units of the free margin
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = width * flip, height  # a negative x-scale mirrors the crop
    theta[:, 0, 2], theta[:, 1, 2] = shift[:, 0] * (1 - width), shift[:, 1] * (1 - height)
    grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def pad_crop_flip(images: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """Batched random crop of a zero-padded image plus horizontal flip (the CIFAR augmentation), by gather.
    Shapes: (B, 3, H, W) -> (B, 3, H, W); random numbers from the CPU ``generator``."""
    n, _, height, width = images.shape
    padded = F.pad(images, (padding,) * 4)  # (B, 3, H + 2p, W + 2p)
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator).to(images.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(images.device)
    row_index = offsets[:, :1] + torch.arange(height, device=images.device)  # (B, H)
    col_index = torch.arange(width, device=images.device)
    col_index = torch.where(flip[:, None], col_index.flip(0), col_index) + offsets[:, 1:]  # (B, W)
    batch_index = torch.arange(n, device=images.device)[:, None, None]
    cropped = padded.permute(0, 2, 3, 1)[batch_index, row_index[:, :, None], col_index[:, None, :]]  # (B, H, W, 3)
    return cropped.permute(0, 3, 1, 2)


def random_flips(n: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Which of ``n`` images a ``"flip"`` augmentation mirrors: (n,) bool on the CPU, each with probability 1/2."""
    return torch.rand(n, generator=generator) < 0.5


def prepare_batch(images: Tensor, mean: Sequence[float], std: Sequence[float], augment: str = "none",
                  generator: Optional[torch.Generator] = None, channels_last: bool = False,
                  flips: Optional[Tensor] = None) -> Tensor:
    """uint8 images on the device -> normalised float (B, 3, H, W), augmented by ``augment``: ``"none"``, ``"flip"``,
    ``"crop"`` (random resized crop + flip) or ``"pad"`` (pad-crop + flip); random numbers from the CPU
    ``generator`` (one state for ``--resume``), or the ``"flip"`` draws ``flips`` (B,) bool."""
    x = images.float().div_(255)  # faster to move uint8 and convert on the device
    if augment == "flip":
        flip = (random_flips(x.shape[0], generator) if flips is None else flips).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    elif augment == "crop":
        x = random_resized_crop_flip(x, generator)
    elif augment == "pad":
        x = pad_crop_flip(x, generator)
    elif augment != "none":
        raise ValueError(f"augment must be none, flip, crop or pad, got {augment!r}")
    mean_t = torch.tensor(mean, device=x.device)[:, None, None]
    std_t = torch.tensor(std, device=x.device)[:, None, None]
    x = (x - mean_t) / std_t
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# ══════════════════════════════════════════════════════════════════════════════
#  8. Running: device, batched inference, the readout's predictive, checkpoints
# ══════════════════════════════════════════════════════════════════════════════


def pick_device(name: str = "auto") -> torch.device:
    """The one place that chooses the device: ``"auto"`` is CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but CUDA is not available")
    return torch.device(name)


def use_allowed_cores() -> int:
    """Give torch one compute thread per core this process may run on (``os.sched_getaffinity``) and return the
    count: pinned to fewer cores (taskset, a batch scheduler, sweep.py's slots), more threads would thrash."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(cores)
    return cores


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 autocast (with channels_last) pays off on ``device``: always on CUDA; on a CPU only with bf16
    matrix instructions (AVX512-BF16 or AMX in ``/proc/cpuinfo``): elsewhere bf16 is emulated, slower than float32."""
    if device.type == "cuda":
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no way to tell, so no bf16
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def hardware_name(device: torch.device) -> str:
    """The GPU's name on CUDA, else the CPU's model name (``/proc/cpuinfo``; the platform's processor elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux
        return platform.processor() or "unknown CPU"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")


def code_version() -> str:
    """``git describe --always --dirty`` of the folder this module lives in; "unknown" outside a git checkout."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=30).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):  # no git on the machine
        return "unknown"


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast for the networks on ``device`` (losses and Laplace compute in fp32/fp64 themselves)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def split_to_device(split: Split, device: torch.device, max_fraction: float = 0.5) -> Split:
    """Move a split's uint8 images to the device when they take at most ``max_fraction`` of its free memory,
    so training never copies from the host; otherwise keep them where they are (memory or memmap)."""
    labels, groups = split.labels.to(device), split.groups.to(device)
    too_large = device.type == "cuda" and split.images.numel() > max_fraction * torch.cuda.mem_get_info(device)[0]
    return Split(split.images if too_large else split.images.to(device), labels, groups)


def batch_images(split: Split, index: Union[Tensor, slice], device: torch.device) -> Tensor:
    """The uint8 images at ``index`` (indices, or a slice: a view, no gather) on ``device``; a host-resident split
    is gathered on the host and copied asynchronously (pinned), a device-resident one is indexed in place."""
    # "cuda" names the current GPU, where split_to_device put the images (their device reads "cuda:0")
    if split.images.device.type == device.type and device.index in (None, split.images.device.index):
        return split.images[index if isinstance(index, slice) else index.to(device)]
    batch = split.images[index if isinstance(index, slice) else index.cpu()]
    if device.type == "cuda":
        batch = batch.pin_memory()
    return batch.to(device, non_blocking=True)


@torch.no_grad()
def predict_split(model: EarlyExitNet, split: Split, mean: Sequence[float], std: Sequence[float],
                  device: torch.device, batch_size: int = 256, exits: Optional[Sequence[int]] = None,
                  amp: bool = False, float32_heads: bool = True, flip: bool = False,
                  input_scale: float = 1.0) -> tuple[Tensor, list[Tensor]]:
    """One eval-mode pass over ``split``: logits (K', N, c) and features [(N, p_k)], float32, of the exits in
    ``exits`` (default all), of the images as they are or mirrored (``flip``); ``input_scale`` multiplies the
    normalised images (``delta x``: Kristiadi et al.'s far-away inputs). With ``amp`` the backbone runs under bf16
    autocast in channels_last, the heads in float32 unless ``float32_heads=False``, the linear layers in float32."""
    was_training = model.training
    model.eval()
    exits = list(range(len(model.heads))) if exits is None else list(exits)
    logits, features = [], []
    for start in range(0, len(split), batch_size):
        batch = slice(start, min(start + batch_size, len(split)))
        x = prepare_batch(batch_images(split, batch, device), mean, std, channels_last=amp)
        x = (x.flip(-1) if flip else x) * input_scale  # a flip commutes with normalising
        with autocast(device, amp):  # the backbone in bf16 when amp; the linears always in float32
            batch_features = [f.float() for f in model.forward_features(x, exits, float32_heads)]  # K' x (B, p_k)
            with torch.autocast(device.type, enabled=False):
                batch_logits = [model.heads[k].linear(f) for k, f in zip(exits, batch_features)]  # K' x (B, c)
        logits.append(torch.stack(batch_logits))  # (K', B, c)
        features.append(batch_features)
    model.train(was_training)
    return torch.cat(logits, dim=1), [torch.cat(parts) for parts in zip(*features)]


LOOKUP_AUGMENTS = ("none", "flip")  # augmentations with few enough views for teacher_targets to compute them once


def teacher_targets(teacher: EarlyExitNet, train: Split, mean: Sequence[float], std: Sequence[float], augment: str,
                    device: torch.device, amp: bool = False) -> Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]:
    """A function (batch x, sample indices, flips or None) -> KD target logits (B, c), the teacher's last exit's (head
    and linear in float32). With ``augment`` "none" or "flip" every view's targets are computed once and looked up (a
    teacher's pass costs more than a student's step); random crops make every batch new: computed per batch."""
    teacher.eval()
    if augment not in LOOKUP_AUGMENTS:
        def per_batch(x: Tensor, index: Tensor, flips: Optional[Tensor]) -> Tensor:
            with torch.no_grad(), autocast(device, amp):
                features = teacher.forward_features(x, exits=[-1], float32_heads=True)[0]  # (B, p) float32
            return teacher.heads[-1].linear(features)  # (B, c) float32: outside autocast
        return per_batch
    views = (False, True) if augment == "flip" else (False,)
    table = torch.stack([predict_split(teacher, train, mean, std, device, batch_size=512, exits=[-1], amp=amp,
                                       flip=flip)[0][0] for flip in views])  # (views, N, c)
    return lambda x, index, flips: table[0 if flips is None else flips.long().to(device), index]  # (B, c)


def seeded_generator(seed: int, device: Union[str, torch.device] = "cpu") -> torch.Generator:
    """A fresh generator on ``device`` seeded with ``seed``, the scripts' one seeding rule: every MC or Dirichlet
    computation starts from its own, so a number never depends on what ran before it (train.py and eval.py agree for
    a checkpoint, seed and device; a CPU and a CUDA generator draw different numbers from one seed)."""
    return torch.Generator(device=device).manual_seed(seed)


def tuned_exit_laplace(linear: nn.Linear, train_features: Tensor, val_features: Tensor, y_val: Tensor,
                       n_samples: int = 50, seed: int = 0) -> KFACLaplace:
    """The Laplace of one exit as every script uses it: :meth:`KFACLaplace.fit` on the training features (N, p),
    then ``(T, sigma^2)`` tuned on validation NLL (:func:`tune_laplace`, MC draws from ``seeded_generator(seed)``).
    Predict with ``laplace.predict(features, n_samples, generator=seeded_generator(seed, device))``."""
    bias = None if linear.bias is None else linear.bias.detach()
    laplace = KFACLaplace.fit(train_features, linear.weight.detach(), bias)
    return tune_laplace(laplace, val_features, y_val, n_samples=n_samples,
                        generator=seeded_generator(seed, val_features.device))


def readout_predictive(weighting: str, weight: Tensor, bias: Optional[Tensor], train_logits: Tensor,
                       train_features: Tensor, val_logits: Tensor, val_features: Tensor, y_val: Tensor,
                       n_samples: int = 50, seed: int = 0,
                       n_folds: int = 5) -> tuple[Tensor, Optional[KFACLaplace], Optional[Tensor]]:
    """The readout's predictive on its N training samples, whose margin gives DEDIER's weights, per ``weighting``:

        dedier      softmax(z)                                                    Tiwari et al. (2024)
        dedier-ts   softmax(z / T), T minimising the validation NLL               Guo et al. (2017)
        laplace     KFAC last-layer Laplace fit on the N samples, (T, sigma^2) by validation NLL
        laplace-cv  the same with A, G, N refit without each sample's fold (of ``n_folds``); W~, T, sigma^2 kept
        laplace-ml  the Laplace with sigma^2 by the evidence (MAP fixed) and T = 1: no validation labels

    ``z = train_logits`` (N, c); ``train_features`` (N, p) the inputs of the readout's last layer, ``weight``
    (c, p), ``bias`` (c,) or None; the validation pass ``val_logits`` (M, c), ``val_features`` (M, p), ``y_val``
    (M,) tunes T and sigma^2. Tuning and prediction each draw their ``n_samples`` MC samples from
    ``seeded_generator(seed)``. Returns the probabilities (N, c), the Laplace (None for the softmax weightings) and
    :meth:`KFACLaplace.logit_std` per sample (N,) or None."""
    if weighting == "dedier":
        return torch.softmax(train_logits, -1), None, None
    if weighting == "dedier-ts":
        return torch.softmax(train_logits / tune_temperature(val_logits, y_val), -1), None, None
    laplace = KFACLaplace.fit(train_features, weight, bias)
    if weighting == "laplace-ml":
        laplace = tune_laplace_marglik(laplace)
    else:
        laplace = tune_laplace(laplace, val_features, y_val, n_samples=n_samples,
                               generator=seeded_generator(seed, val_features.device))
    generator = seeded_generator(seed, train_features.device)
    if weighting == "laplace-cv":
        probs, logit_std = cross_fitted_laplace_predict(laplace, train_features, n_folds, n_samples, generator)
    else:
        probs = laplace.predict(train_features, n_samples, generator=generator)  # (N, c)
        logit_std = laplace.logit_std(train_features)  # (N,)
    return probs, laplace, logit_std


def classification_metrics(probs: Tensor, y: Tensor, groups: Tensor, n_groups: int) -> dict[str, float]:
    """The figures Meronen et al. (2024) report for an exit's predictive ``probs`` (N, c) of labels ``y`` (N,):
    top-1, top-5 (with c >= 5 classes), NLPD, ECE and the worst-group accuracy of the argmax over ``groups`` (N,)."""
    pred = probs.argmax(-1)  # (N,)
    metrics = {"top1": float((pred == y).double().mean()), "nlpd": nlpd(probs, y),
               "ece": expected_calibration_error(probs, y),
               "worst_group_acc": worst_group_accuracy(pred, y, groups, n_groups)}
    if probs.shape[1] >= 5:  # the label among the 5 most probable classes
        metrics["top5"] = float((probs.topk(5, dim=-1).indices == y[:, None]).any(-1).double().mean())
    return metrics


def group_means(values: Tensor, groups: Tensor, n_groups: int) -> list[Optional[float]]:
    """Mean of ``values`` (N,) per group ``g`` of ``groups`` (N,), ``sum_{n: g_n = g} v_n / |{n: g_n = g}|``:
    a list of ``n_groups`` floats, None for an empty group."""
    sums = torch.bincount(groups, weights=values.double(), minlength=n_groups)  # (G,)
    counts = torch.bincount(groups, minlength=n_groups)  # (G,)
    return [float(s / c) if c > 0 else None for s, c in zip(sums.tolist(), counts.tolist())]


def pearson_correlation(a: Tensor, b: Tensor) -> Optional[float]:
    """Pearson correlation ``sum (a - mean a)(b - mean b) / (||a - mean a|| ||b - mean b||)`` of two (N,) tensors,
    in float64; None when either is constant (e.g. all sample weights 1)."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denominator = float(a.norm() * b.norm())
    return float(a @ b) / denominator if denominator > 0 else None


def at_search_end(value: float, grid: Sequence[float]) -> bool:
    """Whether a tuned value sits at an end of the grid it was searched on: there the search stopped at the range,
    not at a minimum (``KFACLaplace.TEMPERATURE_GRID``, ``KFACLaplace.PRIOR_VARIANCE_GRID``)."""
    return any(math.isclose(value, end, rel_tol=1e-6) for end in (grid[0], grid[-1]))


def splits_to_device(data: SpuriousDataset, device: torch.device) -> dict[str, Split]:
    """``{"train", "val", "test"}`` of a dataset on the device (see :func:`split_to_device`)."""
    return {name: split_to_device(getattr(data, name), device) for name in ("train", "val", "test")}


def load_run_data(config: dict) -> SpuriousDataset:
    """The dataset of a run from its configuration (train.py's flags as a dict): synth regenerated from ``seed``,
    val and test 1/4 and 1/2 of ``synth_n_train``; the others read from ``data_root`` (:func:`resolve_data_root`)."""
    name = config["dataset"]
    if name == "synth":
        n = config["synth_n_train"]
        return load_dataset("synth", n_train=n, n_val=n // 4, n_test=n // 2, seed=config["seed"],
                            n_classes=config.get("synth_classes", 2))
    if name == "cifar100":
        return load_dataset(name, config.get("data_root"), seed=config["seed"])
    return load_dataset(name, config.get("data_root"), image_size=config.get("image_size") or 224,
                        cache_dir=config.get("cache_dir"))


def run_uses_bf16(config: dict, device: torch.device) -> bool:
    """bf16 autocast and channels_last for a run's networks: where they are fast, unless it asked for float32."""
    return bf16_is_fast(device) and not config.get("float32", False)


def model_to_device(model: EarlyExitNet, device: torch.device, channels_last: bool) -> EarlyExitNet:
    """Move a network to the device; channels_last with bf16 (faster convolutions)."""
    return model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)


def atomic_save(obj: object, path: Union[str, Path]) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(handle)
    try:
        torch.save(obj, temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def load_checkpoint(path: Union[str, Path], **expected) -> dict:
    """Load a checkpoint written by ``train.py`` (tensors and plain Python only: ``weights_only=True``) whose run
    configuration matches ``expected`` (flag name -> value, e.g. ``dataset="synth"``), else one clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: one line that says so, not torch's advice to unpickle
        reason = str(error).strip().split(". ")[0].splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"checkpoint {path} cannot be read as a weights-only torch file (truncated, or not written "
                         f"by train.py): {reason}") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "model_config" not in checkpoint:
        raise ValueError(f"checkpoint {path} is not a kdlaplace checkpoint (no model / model_config)")
    config = checkpoint.get("config", {})
    if any(config.get(key) != value for key, value in expected.items()):
        raise ValueError(f"checkpoint {path} is a run of " + ", ".join(f"{key} {config.get(key)}" for key in expected)
                         + ", not " + ", ".join(f"{key} {value}" for key, value in expected.items()))
    return checkpoint


# ══════════════════════════════════════════════════════════════════════════════
#  9. Torchvision-compatible ResNets and the model factory
# ══════════════════════════════════════════════════════════════════════════════
# Our own ResNet-18/50 with torchvision's parameter names, so torchvision's ImageNet weights load through
# torch.hub without torchvision; build_model puts exits on any backbone of this module.


def _downsample(in_planes: int, out_planes: int, stride: int) -> Optional[nn.Sequential]:
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016), torchvision's attribute names."""
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_planes, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """ResNet bottleneck block, stride on the 3x3 conv (torchvision's "ResNet v1.5"), torchvision's names."""
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(in_planes, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_planes, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """ResNet (He et al. 2016) whose ``state_dict`` keys equal torchvision's, so its ImageNet weights load as is;
    ``cifar_stem=True`` swaps the 7x7/2 conv + max-pool stem for a 3x3/1 conv (32x32 inputs)."""

    def __init__(self, block: type, layers: Sequence[int], n_classes: int, cifar_stem: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False) if cifar_stem else nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(64), nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(3, 2, 1)
        in_planes, self.stage_channels = 64, []
        for index, (planes, blocks, stride) in enumerate(zip((64, 128, 256, 512), layers, (1, 2, 2, 2))):
            modules = [block(in_planes, planes, stride)]  # only a stage's first block strides and may downsample
            in_planes = planes * block.expansion
            modules += [block(in_planes, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{index + 1}", nn.Sequential(*modules))
            self.stage_channels.append(in_planes)
        self.fc = nn.Linear(in_planes, n_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def stage_modules(self) -> list[list[nn.Module]]:
        return [[self.conv1, self.bn1, self.relu, self.maxpool, self.layer1], [self.layer2], [self.layer3],
                [self.layer4]]


TORCHVISION_URLS = {  # torchvision's IMAGENET1K_V1 weights, plain state dicts
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
}
ARCHITECTURES = ("cnn", "resnet18", "resnet50", "resnet18-cifar")


def _load_backbone_weights(backbone: nn.Module, arch: str, pretrained: Union[bool, str, Path]) -> None:
    """Load torchvision-format weights into ``backbone``: every key must match; an ``fc`` of another class
    count keeps its fresh initialisation (fine-tuning to a new task)."""
    if pretrained is True:
        if arch not in TORCHVISION_URLS:
            raise ValueError(f"no ImageNet weights for arch {arch!r}; use pretrained=PATH to a state dict")
        state = torch.hub.load_state_dict_from_url(TORCHVISION_URLS[arch], map_location="cpu", check_hash=True)
    else:
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights: no file {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"pretrained weights {path}: expected a state dict")
    own = backbone.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"pretrained weights for {arch} do not match: missing keys {missing[:5]}, "
                         f"unexpected keys {unexpected[:5]}")
    if state["fc.weight"].shape != own["fc.weight"].shape:  # another class count: new classifier
        state = {**state, "fc.weight": own["fc.weight"], "fc.bias": own["fc.bias"]}
    wrong = [key for key in own if state[key].shape != own[key].shape]
    if wrong:
        raise ValueError(f"pretrained weights for {arch}: shape mismatch at {wrong[0]} "
                         f"({tuple(state[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)})")
    backbone.load_state_dict(state)


def build_model(arch: str, n_classes: int, pretrained: Union[bool, str, Path] = False, width: int = 32,
                input_size: Optional[int] = None, detach_exits: bool = True) -> EarlyExitNet:
    """An :class:`EarlyExitNet` for ``arch`` in ARCHITECTURES, with exits after every stage (the CNN's 3, a ResNet's
    layer1..4); early heads are DEDIER readouts of width min(2 C, 128) (C for ``cnn``). ``pretrained``: ``True``
    loads torchvision's ImageNet weights through ``torch.hub``, a path a local torchvision-format state dict.
    ``input_size`` (for the FLOP count) defaults to 32 for ``cnn`` and ``resnet18-cifar``, else 224.
    ``model.config``, a checkpoint's ``model_config``, keeps every argument but ``pretrained``."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    if not (isinstance(n_classes, int) and n_classes >= 2):
        raise ValueError(f"n_classes must be an integer >= 2, got {n_classes}")
    if arch == "cnn":
        backbone = SmallCNN(n_classes, width)
    elif arch == "resnet50":
        backbone = ResNet(Bottleneck, (3, 4, 6, 3), n_classes)
    else:
        backbone = ResNet(BasicBlock, (2, 2, 2, 2), n_classes, cifar_stem=arch == "resnet18-cifar")
    if pretrained:
        if arch == "cnn":
            raise ValueError("arch 'cnn' has no pretrained weights")
        _load_backbone_weights(backbone, arch, pretrained)
    # DEDIER doubles the channels in its readout (capped at 128); the CPU-sized CNN keeps them, for speed
    heads = [readout_head(c, c if arch == "cnn" else min(2 * c, 128), n_classes)
             for c in backbone.stage_channels[:-1]]
    size = input_size or (32 if arch in ("cnn", "resnet18-cifar") else 224)
    model = EarlyExitNet(backbone, heads, size, detach_exits)
    model.config = dict(arch=arch, n_classes=n_classes, width=width, input_size=size, detach_exits=detach_exits)
    return model


def model_from_checkpoint(checkpoint: dict) -> EarlyExitNet:
    """Rebuild the network described by ``checkpoint["model_config"]`` and load its weights."""
    model = build_model(**checkpoint["model_config"])
    model.load_state_dict(checkpoint["model"])
    return model
