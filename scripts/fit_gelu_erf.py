"""Fits the rational erf that spin's AVX-512 GELU uses for forward passes
(`kernels::elementwise::avx512::gelu16_value`) and prints its coefficients and largest error.

    .venv/bin/python scripts/fit_gelu_erf.py      # needs numpy only

erf(z) ≈ z·P(z²)/Q(z²) on [0, 3.92] (erf rounds to 1 in f32 beyond), P of degree 6 and Q of
degree 4 with Q(0) = 1: linear least squares on Chebyshev nodes, weighted by 1/Q of the previous
fit, with Lawson's reweighting towards the largest error; the best fit of 200 rounds is kept.
The kernel evaluates it in x = z·√2 (GELU's argument), so the printed coefficients are rescaled.
"""
import math

import numpy as np

LIMIT = 3.92
DEG_P, DEG_Q = 6, 4


def fit(z, f, rounds=200):
    s = z * z
    lawson, q_prev = np.ones_like(z), np.ones_like(z)
    best = (math.inf, None, None)
    for _ in range(rounds):
        a = np.hstack([z[:, None] * s[:, None] ** np.arange(DEG_P + 1),
                       -(f[:, None] * s[:, None] ** np.arange(1, DEG_Q + 1))])
        w = lawson / np.abs(q_prev)
        coef, *_ = np.linalg.lstsq(a * w[:, None], f * w, rcond=None)
        p, q = coef[:DEG_P + 1], np.concatenate([[1.0], coef[DEG_P + 1:]])
        q_prev = np.polyval(q[::-1], s)
        err = z * np.polyval(p[::-1], s) / q_prev - f
        worst = np.abs(err).max()
        if worst < best[0]:
            best = (worst, p, q)
        lawson = lawson * (np.abs(err) / worst + 1e-3) ** 0.3
        lawson /= lawson.sum()
    return best


def main():
    n = 6000
    z = (np.cos(np.pi * (np.arange(n) + 0.5) / n) + 1) / 2 * LIMIT
    f = np.array([math.erf(v) for v in z])
    worst, p, q = fit(z, f)
    print(f"largest |error| of erf(z) on [0, {LIMIT}] in exact arithmetic: {worst:.2e}")
    # In x = z·√2: z·P(z²) = x/√2·P(x²/2), Q(z²) = Q(x²/2).
    p_x = [c / 2**i / math.sqrt(2) for i, c in enumerate(p)]
    q_x = [c / 2**i for i, c in enumerate(q)]
    print("P:", ", ".join(str(np.float32(c)) for c in p_x))
    print("Q:", ", ".join(str(np.float32(c)) for c in q_x))
    print(f"clamp |x| at {LIMIT * math.sqrt(2):.6f}")


if __name__ == "__main__":
    main()
