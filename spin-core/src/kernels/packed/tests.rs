//! The packed kernels against their definitions in f64.
use super::*;

/// `len` deterministic values in [−0.5, 0.5), different for each seed (also the AMX tests').
pub(super) fn v(len: usize, seed: usize) -> Vec<f32> {
    crate::kernels::test_values(len, seed)
}

/// The linear layer's two gradient products and its bias's gradient (summed inside the weight
/// gradient's product) against their definitions in f64, added onto old values (and dx also
/// alone, into a buffer of NaN): KC + 29 rows (the weight gradient's inner dimension: a full
/// block and a partial one), 37 outputs (five W-row tiles, the last short) and a full panel of inputs
/// and a partial one: 60 (x packed for the weight gradient) or 64 (x read in place, the
/// partial panel one vector).
#[test]
fn gradient_products_match_the_definition() {
    if !available() {
        return;
    }
    for inp in [60, 64] {
        gradient_products_for(inp);
    }
}

fn gradient_products_for(inp: usize) {
    let (rows, out) = (KC + 29, 37);
    let (gy, w, x) = (v(rows * out, 1), v(out * inp, 2), v(rows * inp, 3));
    let (gx0, gw0, gb0) = (v(rows * inp, 4), v(out * inp, 5), v(out, 6));
    let (mut gx, mut gw, mut gb) = (gx0.clone(), gw0.clone(), gb0.clone());
    linear_grad_input(&gy, &w, (out, inp), &mut gx, true);
    // Not accumulating, every value is written (NaN where one was not).
    let mut gx_alone = vec![f32::NAN; rows * inp];
    linear_grad_input(&gy, &w, (out, inp), &mut gx_alone, false);
    linear_grad_weight(&gy, &x, (out, inp), &mut gw, Some(&mut gb));
    for o in 0..out {
        let want = gb0[o] as f64 + (0..rows).map(|r| gy[r * out + o] as f64).sum::<f64>();
        assert!((gb[o] as f64 - want).abs() < 1e-5, "db ({o}), {inp} inputs");
    }
    for r in 0..rows {
        for i in 0..inp {
            let want = gx0[r * inp + i] as f64
                + (0..out)
                    .map(|o| gy[r * out + o] as f64 * w[o * inp + i] as f64)
                    .sum::<f64>();
            assert!(
                (gx[r * inp + i] as f64 - want).abs() < 1e-5
                    && (gx_alone[r * inp + i] as f64 - (want - gx0[r * inp + i] as f64)).abs() < 1e-5,
                "dx ({r}, {i}), {inp} inputs"
            );
        }
    }
    for o in 0..out {
        for i in 0..inp {
            let want = gw0[o * inp + i] as f64
                + (0..rows)
                    .map(|r| gy[r * out + o] as f64 * x[r * inp + i] as f64)
                    .sum::<f64>();
            assert!(
                (gw[o * inp + i] as f64 - want).abs() < 1e-5,
                "dW ({o}, {i}), {inp} inputs"
            );
        }
    }
}

/// The layouts a weight can take: the AVX-512 kernel's panels, and a kept weight's (split
/// for AMX tiles where the CPU has them, the same panels elsewhere).
type Pack = fn(&[f32], usize, usize) -> PackedRhs;
const PACKINGS: [(&str, Pack); 2] = [("panels", PackedRhs::pack), ("kept", PackedRhs::pack_kept)];

#[test]
fn packed_products_match_the_definition() {
    if !available() {
        return;
    }
    // 29 rows (three full tiles and a partial one; on AMX a block with a short bottom half);
    // a full panel of outputs and a partial one of one vector (60) or two (80); an inner
    // dimension within one block and across three; with and without accumulation; both
    // layouts. Tolerance 1e-5, relative above 1 (sums of 3109 products reach 11).
    for (k, n, accumulate) in [
        (37, 60, false),
        (37, 80, true),
        (2 * KC_IN_PLACE + 37, 80, false),
        (2 * KC_IN_PLACE + 37, 60, true),
    ] {
        let rows = 29;
        let (x, wt, bias, old) = (v(rows * k, 1), v(k * n, 2), v(n, 3), v(rows * n, 4));
        for (kind, pack) in PACKINGS {
            let packed = pack(&wt, k, n);
            let mut got = if accumulate {
                old.clone()
            } else {
                vec![f32::NAN; rows * n]
            };
            linear_packed(&mut got, &x, &packed, &bias, accumulate);
            for i in 0..rows {
                for j in 0..n {
                    let dot: f64 = (0..k).map(|l| x[i * k + l] as f64 * wt[l * n + j] as f64).sum();
                    let want = dot + bias[j] as f64 + if accumulate { old[i * n + j] as f64 } else { 0.0 };
                    let e = (got[i * n + j] as f64 - want).abs();
                    assert!(
                        e < 1e-5 * want.abs().max(1.0),
                        "{kind}, accumulate {accumulate} ({i}, {j}): {} vs {want}",
                        got[i * n + j]
                    );
                }
            }
        }
    }
}

/// The fused epilogue against its definition in f64: `act(x·W + b)·s + t + skip`, for GELU
/// and ReLU, with an inner dimension across two blocks (the epilogue only after the last),
/// in both layouts (on AMX: 11 rows, a short block of the top half only), within 1e-5,
/// relative above 1.
#[test]
fn epilogue_products_match_the_definition() {
    use crate::base::{Act, SpinDtype};
    if !available() {
        return;
    }
    let (rows, k, n) = (11, KC_IN_PLACE + 21, 60);
    let (x, wt, skip) = (v(rows * k, 1), v(k * n, 2), v(rows * n, 3));
    let (bias, scale, shift) = (v(n, 4), v(n, 5), v(n, 6));
    for ((kind, pack), act) in PACKINGS
        .into_iter()
        .flat_map(|p| [(p, Act::Gelu), (p, Act::Relu)])
    {
        let packed = pack(&wt, k, n);
        let epi = Epilogue {
            bias: &bias,
            scale: &scale,
            shift: &shift,
            act,
        };
        let mut got = vec![f32::NAN; rows * n];
        matmul_packed_epilogue(&mut got, Lhs::rows(&x, rows, k), &packed, &epi, Some(&skip));
        for i in 0..rows {
            for j in 0..n {
                let a = bias[j] as f64
                    + (0..k)
                        .map(|l| x[i * k + l] as f64 * wt[l * n + j] as f64)
                        .sum::<f64>();
                let y = match act {
                    Act::Gelu => a.gelu_and_grad().0,
                    Act::Relu => a.max(0.0),
                };
                let want = y * scale[j] as f64 + shift[j] as f64 + skip[i * n + j] as f64;
                let e = (got[i * n + j] as f64 - want).abs();
                assert!(
                    e < 1e-5 * want.abs().max(1.0),
                    "{kind}, {act:?} ({i}, {j}): {} vs {want}",
                    got[i * n + j]
                );
            }
        }
    }
}
