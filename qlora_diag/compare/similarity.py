"""The math of the weight-level diagnosis: LoRA updates ΔW = scale·B·A and how alike two are.

Everything is computed in float64 whatever the input dtype (adapters are saved in float32 or
bfloat16; a cosine near 1 needs more digits than that to be told apart from 1).

Why only ΔW and never A or B alone: the factorization is not unique. For any invertible r×r
matrix R, ``B·R`` and ``R⁻¹·A`` give the same update, the same model and the same outputs. Public
tools that compare adapters by flattening the factors (cosine of ``[A; B]`` vectors) report
different numbers for these identical adapters; every function here depends on the product only,
so it returns the same number for any re-factorization (see ``tests/test_similarity.py``).

Conventions: ``A`` is r×in (PEFT's ``lora_A.weight``), ``B`` is out×r (``lora_B.weight``),
``scale`` is alpha/r, or alpha/sqrt(r) with rsLoRA (Kalajdzievski 2023), as PEFT applies it.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

_F64 = torch.float64


def _f64(x: Tensor) -> Tensor:
    return x.detach().to(dtype=_F64, device="cpu")


def delta_w(A: Tensor, B: Tensor, scale: float) -> Tensor:
    """The dense LoRA update ΔW = scale·B·A (out×in, float64), as added to the base weight
    (Hu et al. 2021, Sec. 4.1: h = W0·x + B·A·x, with B·A scaled by alpha/r)."""
    if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"delta_w: need A r×in and B out×r, got A {tuple(A.shape)}, "
                         f"B {tuple(B.shape)}")
    return scale * (_f64(B) @ _f64(A))


def cosine(x: Tensor, y: Tensor) -> float:
    """Cosine of the angle between two tensors seen as flat vectors, <x, y>_F / (‖x‖_F·‖y‖_F).

    1 for tensors pointing the same way (any positive scaling), -1 for opposite, 0 for
    orthogonal; nan when either norm is zero (the angle is undefined, e.g. an untrained adapter
    whose B is still zero).
    """
    if x.shape != y.shape:
        raise ValueError(f"cosine: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
    x, y = _f64(x).flatten(), _f64(y).flatten()
    nx, ny = torch.linalg.vector_norm(x).item(), torch.linalg.vector_norm(y).item()
    if nx == 0.0 or ny == 0.0:
        return math.nan
    return torch.dot(x, y).item() / (nx * ny)


def relative_frobenius(x: Tensor, y: Tensor) -> float:
    """‖x − y‖_F / ‖y‖_F: the distance from x to the *reference* y, as a fraction of the
    reference's size (not symmetric: swap the arguments to change the reference).

    0 for identical tensors; nan when the reference is zero (no scale to be relative to).
    """
    if x.shape != y.shape:
        raise ValueError(f"relative_frobenius: shapes differ, {tuple(x.shape)} vs "
                         f"{tuple(y.shape)}")
    x, y = _f64(x), _f64(y)
    ny = torch.linalg.vector_norm(y).item()
    if ny == 0.0:
        return math.nan
    return torch.linalg.vector_norm(x - y).item() / ny


def _core(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """B·A = Q_B·(R_B·R_Aᵀ)·Q_Aᵀ with orthonormal Q_B (out×r), Q_A (in×r): the small core
    C = R_B·R_Aᵀ (r×r) carries every norm and singular value of B·A."""
    Qb, Rb = torch.linalg.qr(_f64(B))
    Qa, Ra = torch.linalg.qr(_f64(A).T)
    return Qb, Rb @ Ra.T, Qa


def factored_inner(A1: Tensor, B1: Tensor, s1: float, A2: Tensor, B2: Tensor, s2: float) -> float:
    """<ΔW1, ΔW2>_F without forming either ΔW.

    tr((s1·B1A1)ᵀ(s2·B2A2)) = s1·s2·tr(B1ᵀB2 · A2A1ᵀ) = s1·s2·sum((B1ᵀB2) ⊙ (A1A2ᵀ)); both
    factors are r1×r2, so the cost is O((out + in)·r1·r2) instead of O(out·in·r).
    """
    if B1.shape[0] != B2.shape[0] or A1.shape[1] != A2.shape[1]:
        raise ValueError(f"factored_inner: ΔW shapes differ, {(B1.shape[0], A1.shape[1])} vs "
                         f"{(B2.shape[0], A2.shape[1])}")
    bb = _f64(B1).T @ _f64(B2)
    aa = _f64(A1) @ _f64(A2).T
    return s1 * s2 * torch.sum(bb * aa).item()


def factored_norm(A: Tensor, B: Tensor, s: float) -> float:
    """‖s·B·A‖_F without forming it: |s|·‖R_B·R_Aᵀ‖_F (the orthonormal Q factors of the QR
    decompositions of B and Aᵀ do not change a Frobenius norm)."""
    _, core, _ = _core(A, B)
    return abs(s) * torch.linalg.matrix_norm(core).item()


def factored_cosine(A1: Tensor, B1: Tensor, s1: float, A2: Tensor, B2: Tensor, s2: float) -> float:
    """:func:`cosine` of ΔW1 and ΔW2 from their factors; nan when either update is zero."""
    n1, n2 = factored_norm(A1, B1, s1), factored_norm(A2, B2, s2)
    if n1 == 0.0 or n2 == 0.0:
        return math.nan
    return factored_inner(A1, B1, s1, A2, B2, s2) / (n1 * n2)


def factored_distance(A1: Tensor, B1: Tensor, s1: float,
                      A2: Tensor, B2: Tensor, s2: float) -> float:
    """‖ΔW1 − ΔW2‖_F from the factors.

    The difference is itself a low-rank product, ΔW1 − ΔW2 = [s1·B1, −s2·B2]·[A1; A2] (rank
    ≤ r1 + r2), so its norm comes from :func:`factored_norm`. Expanding
    ‖ΔW1‖² + ‖ΔW2‖² − 2<ΔW1, ΔW2> instead would cancel catastrophically for nearly equal updates
    (the very case H1 asks about) and report ~1e-8·‖ΔW‖ for identical ones.
    """
    if B1.shape[0] != B2.shape[0] or A1.shape[1] != A2.shape[1]:
        raise ValueError(f"factored_distance: ΔW shapes differ, {(B1.shape[0], A1.shape[1])} vs "
                         f"{(B2.shape[0], A2.shape[1])}")
    A = torch.cat([_f64(A1), _f64(A2)], dim=0)
    B = torch.cat([s1 * _f64(B1), -s2 * _f64(B2)], dim=1)
    return factored_norm(A, B, 1.0)


def factored_relative_frobenius(A1: Tensor, B1: Tensor, s1: float,
                                A2: Tensor, B2: Tensor, s2: float) -> float:
    """:func:`relative_frobenius` ‖ΔW1 − ΔW2‖_F / ‖ΔW2‖_F from the factors, ΔW2 the reference;
    nan when ΔW2 is zero."""
    n2 = factored_norm(A2, B2, s2)
    if n2 == 0.0:
        return math.nan
    return factored_distance(A1, B1, s1, A2, B2, s2) / n2


def top_singular_vectors(A: Tensor, B: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top-k singular triplets of B·A without forming it: ``(U_k, S_k, V_k)`` with
    ``B·A ≈ U_k·diag(S_k)·V_kᵀ``; U_k is out×k (column space), V_k is in×k (row space, as
    columns, unlike torch.linalg.svd's Vh), S_k descending.

    Thin SVD via the r×r core: B = Q_B·R_B, Aᵀ = Q_A·R_A, so B·A = Q_B·(R_B·R_Aᵀ)·Q_Aᵀ; the SVD
    of the core U_c·S·V_cᵀ gives U = Q_B·U_c, V = Q_A·V_c. Equal to torch.linalg.svd of the dense
    product up to the sign of each singular pair. A positive scale changes S only, so it is not
    an argument. Singular vectors of zero singular values are arbitrary: check S_k before
    reading meaning into them (:func:`numerical_rank`).
    """
    r = min(A.shape[0], A.shape[1], B.shape[0])
    if not 1 <= k <= r:
        raise ValueError(f"top_singular_vectors: k = {k} must be in 1..{r} (the rank bound of "
                         f"B {tuple(B.shape)} · A {tuple(A.shape)})")
    Qb, core, Qa = _core(A, B)
    Uc, S, Vch = torch.linalg.svd(core)
    return Qb @ Uc[:, :k], S[:k], Qa @ Vch.T[:, :k]


def numerical_rank(S: Tensor, shape: tuple[int, int]) -> int:
    """Number of singular values above the usual round-off threshold S_max·max(shape)·eps
    (the default tolerance of numpy.linalg.matrix_rank / torch.linalg.matrix_rank)."""
    if S.numel() == 0 or S.max().item() == 0.0:
        return 0
    tol = S.max().item() * max(shape) * torch.finfo(_F64).eps
    return int((S > tol).sum().item())


def subspace_similarity(U1: Tensor, U2: Tensor, i: int, j: int) -> float:
    """φ(i, j) = ‖U1[:, :i]ᵀ·U2[:, :j]‖²_F / min(i, j), in [0, 1] (Hu et al. 2021, Sec. 7.2).

    U1, U2 have orthonormal columns (singular vectors, most important first). φ is the mean
    squared cosine of the principal angles between the span of the top-i directions of one
    update and the top-j of the other: 1 when one span contains the other, 0 when they are
    orthogonal. Between a fixed i-dim subspace and a uniformly random j-dim one in dimension d,
    E‖U1ᵢᵀU2ⱼ‖²_F = i·j/d, so φ ≈ max(i, j)/d: the chance level to read a number against.
    Apply it to the left (column space, U) and the right (row space, V) singular vectors alike.
    """
    if U1.shape[0] != U2.shape[0]:
        raise ValueError(f"subspace_similarity: ambient dimensions differ, {U1.shape[0]} vs "
                         f"{U2.shape[0]}")
    if not (1 <= i <= U1.shape[1] and 1 <= j <= U2.shape[1]):
        raise ValueError(f"subspace_similarity: need 1 <= i <= {U1.shape[1]} and "
                         f"1 <= j <= {U2.shape[1]}, got i = {i}, j = {j}")
    m = _f64(U1[:, :i]).T @ _f64(U2[:, :j])
    return torch.sum(m * m).item() / min(i, j)


def alignment(correction: Tensor, residual: Tensor) -> float:
    """Does the QLoRA adapter learn to undo the quantization error?

    ``correction`` = ΔW_QLoRA − ΔW_LoRA, ``residual`` = W − deq(Q(W)). QLoRA trains on the
    dequantized weight deq(Q(W)) + ΔW_QLoRA; it matches the 16-bit LoRA model W + ΔW_LoRA
    exactly when the correction equals the residual. The returned cosine is +1 when the extra
    update points along the quantization error it would need to cancel, about 0 when unrelated,
    nan when either is zero. The correction of two rank-r adapters has rank up to 2r, so it can
    reach at most :func:`low_rank_ceiling` (residual, 2r) (r_LoRA + r_QLoRA in general), since
    the residual is close to full rank.
    """
    return cosine(correction, residual)


# The exact float64 SVD is cheap up to about a thousand on the smaller side (SmolLM2's 576-wide
# modules: milliseconds); at 8B (4096 x 14336) it is ~1 min per module on a CPU, where only the
# top r values are needed (issue 15).
EXACT_SVD_MAX_DIM = 1024
# Randomized subspace iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4). A quantization
# residual is close to a Gaussian matrix, whose top spectrum is nearly flat, the hard case:
# on a Gaussian 3000 x 1100 matrix r + 16 columns and 6 iterations were 2.6 % low on the top 4
# values, r + 96 columns and 10 iterations about 1e-3 low (~1-2 s on one CPU core).
LOWRANK_OVERSAMPLE = 96
LOWRANK_POWER_ITERS = 10


def top_singular_values(x: Tensor, r: int, *, exact_max_dim: int = EXACT_SVD_MAX_DIM) -> Tensor:
    """The ``r`` largest singular values of the matrix ``x`` (float64, descending), computed on
    ``x``'s device.

    Exact (``torch.linalg.svdvals`` in float64) when the smaller dimension is at most
    ``exact_max_dim``; else ``torch.svd_lowrank`` with :data:`LOWRANK_OVERSAMPLE` extra columns
    and :data:`LOWRANK_POWER_ITERS` power iterations, in float32, from a fixed seed (the same
    numbers on every run). Those are Ritz values of a subspace, so each is a lower bound of the
    true singular value it estimates."""
    if x.ndim != 2 or r < 1:
        raise ValueError(f"top_singular_values: need a matrix and r >= 1, got shape "
                         f"{tuple(x.shape)}, r = {r}")
    x = x.detach()
    if min(x.shape) <= exact_max_dim:
        return torch.linalg.svdvals(x.to(_F64))[:r]
    q = min(r + LOWRANK_OVERSAMPLE, min(x.shape))
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        _, S, _ = torch.svd_lowrank(x.to(torch.float32), q=q, niter=LOWRANK_POWER_ITERS)
    return S[:r].to(_F64)


def low_rank_ceiling(residual: Tensor, r: int) -> float:
    """The largest cosine any rank-r matrix can have with ``residual``:
    sqrt(σ1² + … + σr²) / ‖residual‖_F (Eckart–Young: the best rank-r approximation is the
    truncated SVD, and it is also the rank-r matrix at the smallest angle). nan for a zero
    residual. It puts :func:`alignment` on a scale: 0.05 means little if 0.06 is the best
    possible. The top r values come from :func:`top_singular_values` and ‖residual‖_F² = Σ σ²
    from the entries, both on the residual's device (no full SVD)."""
    if r < 1:
        raise ValueError(f"low_rank_ceiling: r = {r} must be >= 1")
    total = torch.linalg.vector_norm(residual.detach().to(_F64)).item() ** 2
    if total == 0.0:
        return math.nan
    top = top_singular_values(residual, min(r, min(residual.shape)))
    return min(1.0, math.sqrt(torch.sum(top ** 2).item() / total))
