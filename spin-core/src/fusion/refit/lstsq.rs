//! The least-squares fits of a refit: a linear map, a depthwise conv per channel, and a
//! BatchNorm as a per-channel affine map.
use super::host::{Act2, Norm, Taps};
use crate::base::BN_EPS;
use nalgebra::DMatrix;
use rayon::prelude::*;

impl Norm {
    /// The norm that maps `z` onto `target` best per channel (a shrunk regression slope keeps
    /// nearly constant channels from blowing up), holding `z`'s own statistics.
    pub(super) fn fit(z: &Act2, target: &Act2) -> Self {
        let c = z.ncols();
        let moments: Vec<(f64, f64, f64, f64)> = (0..c)
            .map(|j| {
                let (zc, tc) = (z.column(j), target.column(j));
                let n = zc.len() as f64;
                let zm = zc.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
                let tm = tc.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
                let (mut var, mut cov) = (0.0, 0.0);
                for (&a, &b) in zc.iter().zip(tc.iter()) {
                    let dz = f64::from(a) - zm;
                    var += dz * dz;
                    cov += dz * (f64::from(b) - tm);
                }
                (zm, var / n, cov / n, tm)
            })
            .collect();
        let mean_var = moments.iter().map(|m| m.1).sum::<f64>() / c as f64;
        let mut norm = Self {
            mean: vec![0.0; c],
            var: vec![0.0; c],
            weight: vec![0.0; c],
            bias: vec![0.0; c],
        };
        for (j, &(zm, var, cov, tm)) in moments.iter().enumerate() {
            let slope = cov / (var + 1e-2 * mean_var + f64::MIN_POSITIVE);
            norm.mean[j] = zm as f32;
            norm.var[j] = var as f32;
            norm.weight[j] = (slope * (var + BN_EPS).sqrt()) as f32;
            norm.bias[j] = tm as f32;
        }
        norm
    }
}

/// Solves the ridge-regularised normal equations `(G + λI)·X = R`, λ a small fraction of G's
/// mean diagonal; `X` holds one column per output.
fn solve(mut gram: DMatrix<f64>, rhs: DMatrix<f64>) -> DMatrix<f64> {
    let n = gram.nrows();
    let ridge = 1e-4 * gram.trace() / n as f64 + f64::MIN_POSITIVE;
    for i in 0..n {
        gram[(i, i)] += ridge;
    }
    match gram.clone().cholesky() {
        Some(ch) => ch.solve(&rhs),
        None => gram
            .lu()
            .solve(&rhs)
            .unwrap_or_else(|| DMatrix::zeros(n, rhs.ncols())),
    }
}

/// Least squares `y ≈ W·z + b` over the rows of every `(z, y)` pair: returns `(W, b)`.
pub(super) fn fit_linear(pairs: &[(&Act2, &Act2)]) -> (DMatrix<f32>, Vec<f32>) {
    let (cin, cout) = (pairs[0].0.ncols(), pairs[0].1.ncols());
    let mut gram = DMatrix::<f64>::zeros(cin + 1, cin + 1);
    let mut rhs = DMatrix::<f64>::zeros(cin + 1, cout);
    for (z, y) in pairs {
        let z = z.map(f64::from).insert_column(cin, 1.0);
        gram += z.transpose() * &z;
        rhs += z.transpose() * y.map(f64::from);
    }
    let x = solve(gram, rhs);
    let w = x.rows(0, cin).transpose().map(|v| v as f32);
    let b = x.row(cin).iter().map(|&v| v as f32).collect();
    (w, b)
}

/// Least squares per channel for a depthwise conv: `y[:, c] ≈ conv(z[:, c]) + b[c]`.
pub(super) fn fit_depthwise(pairs: &[(&Act2, &Act2)], taps: &Taps, k: usize) -> (DMatrix<f32>, Vec<f32>) {
    let (c, kk) = (pairs[0].0.ncols(), k * k);
    let fitted: Vec<DMatrix<f64>> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let mut feat = vec![0.0f64; kk + 1];
            let mut gram = DMatrix::<f64>::zeros(kk + 1, kk + 1);
            let mut rhs = DMatrix::<f64>::zeros(kk + 1, 1);
            for (z, y) in pairs {
                let (zc, yc) = (z.column(ch), y.column(ch));
                for row in 0..z.nrows() {
                    feat.fill(0.0);
                    for &(t, a) in &taps[row] {
                        feat[t] = f64::from(zc[a]);
                    }
                    feat[kk] = 1.0;
                    let t = f64::from(yc[row]);
                    for i in 0..=kk {
                        rhs[i] += feat[i] * t;
                        for j in 0..=i {
                            gram[(i, j)] += feat[i] * feat[j];
                        }
                    }
                }
            }
            gram.fill_upper_triangle_with_lower_triangle();
            solve(gram, rhs)
        })
        .collect();
    let w = DMatrix::<f32>::from_fn(c, kk, |ch, t| fitted[ch][t] as f32);
    let b = fitted.iter().map(|x| x[kk] as f32).collect();
    (w, b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fusion::refit::host::{depthwise, linear, taps};

    #[test]
    fn linear_and_depthwise_fits_recover_exact_maps() {
        let (g, k, c, rows) = (4, 3, 3, 2 * 16);
        let z = Act2::from_fn(rows, c, |r, j| ((r * 7 + j * 13) % 11) as f32 / 5.0 - 1.0);
        let w = DMatrix::<f32>::from_fn(c, c, |i, j| (i as f32 - j as f32) * 0.3 + 0.1);
        let b = vec![0.5, -0.25, 1.0];
        let y = linear(&z, &w, &b);
        let (w2, b2) = fit_linear(&[(&z, &y)]);
        assert!((w2 - &w).amax() < 1e-3 && b2.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-3));
        let kw = DMatrix::<f32>::from_fn(c, k * k, |i, t| ((i + 2 * t) % 5) as f32 * 0.2 - 0.4);
        let taps = taps(rows, g, k);
        let y = depthwise(&z, &kw, &b, &taps);
        let (kw2, b2) = fit_depthwise(&[(&z, &y)], &taps, k);
        assert!((kw2 - &kw).amax() < 1e-3 && b2.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-3));
    }

    #[test]
    fn a_fitted_norm_maps_its_input_onto_an_affine_target() {
        let z = Act2::from_fn(50, 2, |r, j| (r as f32 * 0.37 + j as f32).sin());
        let target = Act2::from_fn(50, 2, |r, j| [2.0, -0.5][j] * z[(r, j)] + [1.0, 3.0][j]);
        let norm = Norm::fit(&z, &target);
        let mut y = z.clone();
        norm.apply(&mut y);
        // The slope is shrunk by 1 % of the mean variance: within 2 % of the target's spread.
        assert!((y - target).amax() < 0.03);
    }
}
