//! The global average pool over each image's tokens, `(B·N, C)` → `(B, C)`, and its gradient:
//! one task per image, rows summed in lane-wide loops (dfdx's `mean` over the token axis walks
//! every value by strided index: 4.6 % of the digits ConvMixer's forward pass).
use crate::base::SpinDtype;
use multiversion::multiversion;
use rayon::prelude::*;

/// The mean of each image's `x.len() / (images · c)` rows of `c` values, `(images, c)`.
pub fn mean_tokens<E: SpinDtype>(x: &[E], images: usize, c: usize) -> Vec<E> {
    let image = x.len() / images.max(1);
    assert!(
        image * images == x.len() && image.is_multiple_of(c.max(1)),
        "mean_tokens: sizes"
    );
    let mut out = vec![E::zero(); images * c];
    if c == 0 || image == 0 {
        return out;
    }
    let scale = E::cast(1.0 / (image / c) as f64);
    out.par_chunks_mut(c)
        .zip(x.par_chunks(image))
        .for_each(|(o, xs)| sum_rows(o, xs, scale));
    out
}

/// `o = scale · Σ rows of xs`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn sum_rows<E: SpinDtype>(o: &mut [E], xs: &[E], scale: E) {
    for row in xs.chunks_exact(o.len()) {
        for (a, &v) in o.iter_mut().zip(row) {
            *a += v;
        }
    }
    for a in o.iter_mut() {
        *a *= scale;
    }
}

/// The gradient of [`mean_tokens`]: `gx[image's rows] += gy[image] / N`.
pub fn mean_tokens_grad<E: SpinDtype>(gx: &mut [E], gy: &[E], c: usize) {
    let images = gy.len() / c.max(1);
    let image = gx.len() / images.max(1);
    assert!(
        image * images == gx.len() && images * c == gy.len(),
        "mean_tokens_grad: sizes"
    );
    if c == 0 || image == 0 {
        return;
    }
    let scale = E::cast(1.0 / (image / c) as f64);
    gx.par_chunks_mut(image)
        .zip(gy.par_chunks(c))
        .for_each(|(g, dy)| spread_rows(g, dy, scale));
}

/// Every row of `g` += `scale · dy`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn spread_rows<E: SpinDtype>(g: &mut [E], dy: &[E], scale: E) {
    for row in g.chunks_exact_mut(dy.len()) {
        for (a, &v) in row.iter_mut().zip(dy) {
            *a += scale * v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both directions against their definitions in f64 (1e-12): 3 images of 5 tokens and 7
    /// channels, the gradient added onto what the buffer held.
    #[test]
    fn mean_and_gradient_match_the_definition() {
        let (images, n, c) = (3, 5, 7);
        let x: Vec<f64> = (0..images * n * c)
            .map(|i| ((i * 37) % 23) as f64 - 11.0)
            .collect();
        let got = mean_tokens(&x, images, c);
        let gy: Vec<f64> = (0..images * c).map(|i| i as f64 * 0.5 - 3.0).collect();
        let mut gx = vec![1.0; x.len()];
        mean_tokens_grad(&mut gx, &gy, c);
        for b in 0..images {
            for j in 0..c {
                let want = (0..n).map(|t| x[(b * n + t) * c + j]).sum::<f64>() / n as f64;
                assert!((got[b * c + j] - want).abs() < 1e-12, "mean ({b}, {j})");
                for t in 0..n {
                    let g = gx[(b * n + t) * c + j];
                    assert!(
                        (g - (1.0 + gy[b * c + j] / n as f64)).abs() < 1e-12,
                        "grad ({b}, {t}, {j})"
                    );
                }
            }
        }
    }
}
