"""Known-answer tests for qlora_diag.compare.similarity: each answer follows from the construction."""
from __future__ import annotations

import math

import pytest
import torch

from qlora_diag.compare import similarity as sim

OUT, IN, R = 48, 40, 4


def _factors(seed: int, out: int = OUT, inp: int = IN, r: int = R):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(r, inp, generator=g, dtype=torch.float64),
            torch.randn(out, r, generator=g, dtype=torch.float64))


def _orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return q


def _rotate(A, B, seed: int):
    """The same update re-factored: (B·R)(R⁻¹·A) = B·A for an invertible, non-orthogonal R."""
    g = torch.Generator().manual_seed(seed)
    Rm = torch.randn(A.shape[0], A.shape[0], generator=g, dtype=torch.float64) \
        + 3 * torch.eye(A.shape[0], dtype=torch.float64)
    return torch.linalg.solve(Rm, A), B @ Rm


def _all_numbers(A1, B1, s1, A2, B2, s2, k=2):
    U1, _, V1 = sim.top_singular_vectors(A1, B1, k)
    U2, _, V2 = sim.top_singular_vectors(A2, B2, k)
    d1, d2 = sim.delta_w(A1, B1, s1), sim.delta_w(A2, B2, s2)
    return [sim.cosine(d1, d2), sim.relative_frobenius(d1, d2),
            sim.factored_inner(A1, B1, s1, A2, B2, s2), sim.factored_norm(A1, B1, s1),
            sim.factored_cosine(A1, B1, s1, A2, B2, s2),
            sim.factored_relative_frobenius(A1, B1, s1, A2, B2, s2),
            sim.factored_distance(A1, B1, s1, A2, B2, s2),
            sim.subspace_similarity(U1, U2, k, k), sim.subspace_similarity(V1, V2, k, k),
            sim.subspace_similarity(U1, U2, 1, k)]


def test_delta_w_is_scaled_product_and_float64():
    A = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16)       # r=1, in=2
    B = torch.tensor([[3.0], [4.0]], dtype=torch.bfloat16)     # out=2, r=1
    d = sim.delta_w(A, B, 0.5)
    assert d.dtype == torch.float64
    torch.testing.assert_close(d, torch.tensor([[1.5, 3.0], [2.0, 4.0]], dtype=torch.float64))
    with pytest.raises(ValueError):
        sim.delta_w(A, A, 1.0)  # B must be out×r with r = A.shape[0]


def test_cosine_known_cases():
    x = torch.randn(6, 5, dtype=torch.float64)
    assert sim.cosine(x, x) == pytest.approx(1.0)
    assert sim.cosine(x, 7.5 * x) == pytest.approx(1.0)
    assert sim.cosine(x, -x) == pytest.approx(-1.0)
    e1, e2 = torch.zeros(3, 3), torch.zeros(3, 3)
    e1[0, 0], e2[1, 2] = 1.0, 5.0
    assert sim.cosine(e1, e2) == 0.0
    # 45 degrees by construction
    assert sim.cosine(e1, e1 + e2 / 5) == pytest.approx(1 / math.sqrt(2))
    assert math.isnan(sim.cosine(x, torch.zeros_like(x)))
    assert math.isnan(sim.cosine(torch.zeros_like(x), x))


def test_relative_frobenius_known_cases_and_reference():
    y = torch.randn(4, 7, dtype=torch.float64)
    assert sim.relative_frobenius(y, y) == 0.0
    assert sim.relative_frobenius(1.1 * y, y) == pytest.approx(0.1)
    assert sim.relative_frobenius(-y, y) == pytest.approx(2.0)
    # y is the reference: 2y vs y is 100 %, y vs 2y is 50 %
    assert sim.relative_frobenius(2 * y, y) == pytest.approx(1.0)
    assert sim.relative_frobenius(y, 2 * y) == pytest.approx(0.5)
    assert math.isnan(sim.relative_frobenius(y, torch.zeros_like(y)))
    assert sim.relative_frobenius(torch.zeros_like(y), y) == pytest.approx(1.0)


def test_factored_equals_dense():
    A1, B1 = _factors(1)
    A2, B2 = _factors(2, r=6)  # ranks may differ
    s1, s2 = 2.0, 16 / math.sqrt(6)
    d1, d2 = sim.delta_w(A1, B1, s1), sim.delta_w(A2, B2, s2)
    assert sim.factored_inner(A1, B1, s1, A2, B2, s2) == pytest.approx(torch.sum(d1 * d2).item())
    assert sim.factored_norm(A1, B1, s1) == pytest.approx(torch.linalg.matrix_norm(d1).item())
    assert sim.factored_cosine(A1, B1, s1, A2, B2, s2) == pytest.approx(sim.cosine(d1, d2))
    assert sim.factored_relative_frobenius(A1, B1, s1, A2, B2, s2) == pytest.approx(
        sim.relative_frobenius(d1, d2))
    assert sim.factored_distance(A1, B1, s1, A2, B2, s2) == pytest.approx(
        torch.linalg.matrix_norm(d1 - d2).item())


def test_factored_known_cases():
    A, B = _factors(3)
    assert sim.factored_cosine(A, B, 2.0, A, B, 2.0) == pytest.approx(1.0)
    assert sim.factored_cosine(A, B, 2.0, A, -B, 2.0) == pytest.approx(-1.0)
    assert sim.factored_cosine(A, B, 2.0, A, B, 0.25) == pytest.approx(1.0)
    # identical updates: exactly representable difference, so no cancellation noise
    assert sim.factored_relative_frobenius(A, B, 2.0, A, B, 2.0) < 1e-14
    assert sim.factored_relative_frobenius(A, B, 2.2, A, B, 2.0) == pytest.approx(0.1)
    # column spaces orthogonal (B's in the first rows, B2's in the last): inner product 0
    B1 = torch.zeros(OUT, R, dtype=torch.float64)
    B2 = torch.zeros(OUT, R, dtype=torch.float64)
    B1[:R], B2[-R:] = torch.eye(R), torch.eye(R)
    assert sim.factored_cosine(A, B1, 1.0, A, B2, 1.0) == 0.0
    zero_B = torch.zeros(OUT, R, dtype=torch.float64)
    assert sim.factored_norm(A, zero_B, 1.0) == 0.0
    assert math.isnan(sim.factored_cosine(A, zero_B, 1.0, A, B, 1.0))
    assert math.isnan(sim.factored_relative_frobenius(A, B, 1.0, A, zero_B, 1.0))


def test_top_singular_vectors_match_dense_svd_up_to_sign():
    A, B = _factors(4)
    k = 3
    U, S, V = sim.top_singular_vectors(A, B, k)
    Ud, Sd, Vhd = torch.linalg.svd(B @ A)
    torch.testing.assert_close(S, Sd[:k])
    signs = torch.sign(torch.sum(U * Ud[:, :k], dim=0))
    torch.testing.assert_close(U, Ud[:, :k] * signs)
    torch.testing.assert_close(V, Vhd[:k].T * signs)
    # orthonormal columns, and the full-rank triplets rebuild the product
    torch.testing.assert_close(U.T @ U, torch.eye(k, dtype=torch.float64))
    Uf, Sf, Vf = sim.top_singular_vectors(A, B, R)
    torch.testing.assert_close(Uf @ torch.diag(Sf) @ Vf.T, B @ A)
    with pytest.raises(ValueError):
        sim.top_singular_vectors(A, B, R + 1)


def test_numerical_rank():
    A, B = _factors(5)
    _, S, _ = sim.top_singular_vectors(A, B, R)
    assert sim.numerical_rank(S, (OUT, IN)) == R
    B[:, 2:] = 0.0  # rank 2 by construction
    _, S, _ = sim.top_singular_vectors(A, B, R)
    assert sim.numerical_rank(S, (OUT, IN)) == 2
    assert sim.numerical_rank(torch.zeros(3, dtype=torch.float64), (OUT, IN)) == 0


def test_subspace_similarity_exact_cases():
    U = _orthonormal(30, 5, seed=6)
    assert sim.subspace_similarity(U, U, 5, 5) == pytest.approx(1.0)
    # the same span in another basis is still the same subspace
    Q = _orthonormal(5, 5, seed=7)
    assert sim.subspace_similarity(U, U @ Q, 5, 5) == pytest.approx(1.0)
    # nested: the top-2 span lies inside the top-5 span -> 1 (normalized by min(i, j))
    assert sim.subspace_similarity(U, U, 2, 5) == pytest.approx(1.0)
    # orthogonal: the first 5 and the last 5 of one orthonormal basis
    W = _orthonormal(30, 10, seed=8)
    assert sim.subspace_similarity(W[:, :5], W[:, 5:], 5, 5) == pytest.approx(0.0, abs=1e-15)
    # half overlapping: span{e1, e2} vs span{e1, e3} -> 1/2
    E = torch.eye(30, dtype=torch.float64)
    assert sim.subspace_similarity(E[:, [0, 1]], E[:, [0, 2]], 2, 2) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        sim.subspace_similarity(U, U, 6, 1)


def test_subspace_similarity_random_is_near_chance():
    # E||U1_i^T U2_j||_F^2 = i*j/d, so phi ~ max(i, j)/d for random subspaces
    d, i, j = 2000, 4, 8
    vals = [sim.subspace_similarity(_orthonormal(d, i, s), _orthonormal(d, j, 100 + s), i, j)
            for s in range(5)]
    assert sum(vals) / len(vals) == pytest.approx(max(i, j) / d, rel=0.3)


def test_random_pair_in_high_dimension_is_near_orthogonal():
    A1, B1 = _factors(9, out=1000, inp=1000, r=4)
    A2, B2 = _factors(10, out=1000, inp=1000, r=4)
    # cos of two independent random rank-4 products: std ~ 1/sqrt(1000*1000/16)
    assert abs(sim.factored_cosine(A1, B1, 1.0, A2, B2, 1.0)) < 0.02


def test_every_number_is_invariant_under_refactorization():
    A1, B1 = _factors(11)
    A2, B2 = _factors(12)
    s1, s2 = 2.0, 4.0
    base = _all_numbers(A1, B1, s1, A2, B2, s2)
    A1r, B1r = _rotate(A1, B1, seed=13)
    A2r, B2r = _rotate(A2, B2, seed=14)
    assert not torch.allclose(A1r, A1)  # the factors really changed
    rotated = _all_numbers(A1r, B1r, s1, A2r, B2r, s2)
    assert rotated == pytest.approx(base, rel=1e-9, abs=1e-12)
    # and one adapter against its own re-factorization compares as identical
    assert sim.factored_cosine(A1, B1, s1, A1r, B1r, s1) == pytest.approx(1.0)
    assert sim.factored_relative_frobenius(A1, B1, s1, A1r, B1r, s1) < 1e-12
    U, _, V = sim.top_singular_vectors(A1, B1, 3)
    Ur, _, Vr = sim.top_singular_vectors(A1r, B1r, 3)
    assert sim.subspace_similarity(U, Ur, 3, 3) == pytest.approx(1.0)
    assert sim.subspace_similarity(V, Vr, 3, 3) == pytest.approx(1.0)


def test_flattened_factor_cosine_is_not_invariant():
    """What public tools do (cosine of the flattened [A; B] factors) calls an adapter and its
    own harmless re-factorization different; the ΔW cosine does not."""
    A, B = _factors(15)
    Ar, Br = _rotate(A, B, seed=16)
    flat = torch.cat([A.flatten(), B.flatten()])
    flat_r = torch.cat([Ar.flatten(), Br.flatten()])
    assert sim.cosine(flat, flat_r) < 0.99
    assert sim.factored_cosine(A, B, 1.0, Ar, Br, 1.0) == pytest.approx(1.0)


def test_alignment_is_one_when_correction_is_a_multiple_of_residual():
    g = torch.Generator().manual_seed(17)
    residual = torch.randn(OUT, IN, generator=g).to(torch.float32)  # as from the quantize stage
    d_lora = torch.randn(OUT, IN, generator=g, dtype=torch.float64)
    d_qlora = d_lora + 0.3 * residual.to(torch.float64)
    assert sim.alignment(d_qlora - d_lora, residual) == pytest.approx(1.0)
    assert sim.alignment(d_lora - d_qlora, residual) == pytest.approx(-1.0)
    assert math.isnan(sim.alignment(torch.zeros(OUT, IN), residual))


def test_low_rank_ceiling_known_cases():
    # residual = diag(3, 4, 12) padded: rank-1 ceiling 12/13, rank-2 sqrt(160)/13, rank-3 1
    res = torch.zeros(5, 6, dtype=torch.float64)
    res[0, 0], res[1, 1], res[2, 2] = 3.0, 4.0, 12.0
    assert sim.low_rank_ceiling(res, 1) == pytest.approx(12 / 13)
    assert sim.low_rank_ceiling(res, 2) == pytest.approx(math.sqrt(160) / 13)
    assert sim.low_rank_ceiling(res, 3) == pytest.approx(1.0)
    # the truncated SVD reaches the ceiling
    U, S, Vh = torch.linalg.svd(res)
    best = U[:, :1] @ torch.diag(S[:1]) @ Vh[:1]
    assert sim.alignment(best, res) == pytest.approx(sim.low_rank_ceiling(res, 1))
    assert math.isnan(sim.low_rank_ceiling(torch.zeros(3, 3), 1))


def _with_singular_values(s: torch.Tensor, rows: int, cols: int, seed: int) -> torch.Tensor:
    """U·diag(s)·Vᵀ with random orthonormal U (rows × k) and V (cols × k): singular values s."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(rows, len(s), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(cols, len(s), generator=g, dtype=torch.float64))
    return U @ torch.diag(s) @ V.T


def test_top_singular_values_known_answer_exact_and_randomized():
    s = 10.0 * 0.9 ** torch.arange(120, dtype=torch.float64)  # known, decaying spectrum
    x = _with_singular_values(s, 400, 300, seed=5).float()
    exact = sim.top_singular_values(x, 4)  # 300 <= EXACT_SVD_MAX_DIM: float64 svdvals
    torch.testing.assert_close(exact, s[:4], rtol=1e-6, atol=0)
    randomized = sim.top_singular_values(x, 4, exact_max_dim=100)  # svd_lowrank
    torch.testing.assert_close(randomized, s[:4], rtol=1e-5, atol=0)
    assert torch.equal(randomized, sim.top_singular_values(x, 4, exact_max_dim=100))  # seeded


def test_low_rank_ceiling_above_the_exact_size_known_answer():
    """A residual wider than EXACT_SVD_MAX_DIM on both sides takes the randomized top-r path;
    its ceiling is sqrt(σ1² + … + σr²) / ‖x‖_F of the constructed spectrum."""
    n = sim.EXACT_SVD_MAX_DIM + 8
    s = 1.0 + 5.0 * 0.8 ** torch.arange(n, dtype=torch.float64)  # a flat floor under a peak
    x = _with_singular_values(s, n + 40, n, seed=9).float()
    for r in (1, 3):
        expected = math.sqrt(float((s[:r] ** 2).sum() / (s ** 2).sum()))
        assert sim.low_rank_ceiling(x, r) == pytest.approx(expected, rel=1e-4)
