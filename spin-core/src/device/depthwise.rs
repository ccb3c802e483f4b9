//! The depthwise K×K convolution op: the CPU kernel ([`crate::kernels::depthwise`]) on dfdx's
//! tape, and a fallback from dfdx's own ops for other devices (also the reference in tests).
use super::{transpose, values, with_grad};
use crate::base::{Nhwc, SpinDtype};
use crate::kernels::depthwise::{backward, forward, DwGeometry};
use crate::kernels::elementwise::add_into;
use dfdx::prelude::*;
use dfdx::tensor::{Storage, Tape};

/// Depthwise convolution on a device.
pub trait DepthwiseKernel<E: SpinDtype>: Storage<E> + Sized {
    /// Depthwise K×K convolution, stride 1, zero 'same' padding (odd K), with bias.
    /// `x` is `(B, H, W, C)`, `w` is PyTorch's `(C, 1, K, K)` flattened to `(C, K·K)`, `b` is `(C,)`.
    fn dwconv<T: Tape<E, Self> + Merge<T>>(
        x: Tensor<Nhwc, E, Self, T>,
        w: Tensor<(usize, usize), E, Self, T>,
        b: Tensor<(usize,), E, Self, T>,
        k: usize,
    ) -> Result<Tensor<Nhwc, E, Self, T>, Self::Err>;
}

impl<E: SpinDtype> DepthwiseKernel<E> for Cpu {
    fn dwconv<T: Tape<E, Self> + Merge<T>>(
        x: Tensor<Nhwc, E, Self, T>,
        w: Tensor<(usize, usize), E, Self, T>,
        b: Tensor<(usize,), E, Self, T>,
        k: usize,
    ) -> Result<Tensor<Nhwc, E, Self, T>, Self::Err> {
        let (x, tx) = x.contiguous().split_tape();
        let (w, tw) = w.contiguous().split_tape();
        let (b, tb) = b.contiguous().split_tape();
        let mut tape = tx.merge(tw).merge(tb);
        let geo = DwGeometry::new(*x.shape(), k);
        assert_eq!(
            w.shape().0,
            geo.c,
            "dwconv: weight has {} channels, input {}",
            w.shape().0,
            geo.c
        );
        assert_eq!(w.shape().1, k * k, "dwconv: weight is not K·K per channel");
        let xs = values(&x);
        let wt = transpose(&values(&w), geo.c, k * k);
        let out = forward(&geo, &xs, &wt, &values(&b), None);
        let y = x.device().tensor_from_vec(out, *x.shape());
        if T::OWNS_TAPE {
            let y_keep = y.clone();
            tape.add_backward_op(move |grads| {
                with_grad(grads, &y_keep, "depthwise", |grads, gy| {
                    let (gx, gw, gb) = backward(&geo, &xs, &wt, gy);
                    add_into(grads.get_or_alloc_mut(&x)?, &gx);
                    add_into(grads.get_or_alloc_mut(&w)?, &transpose(&gw, k * k, geo.c));
                    add_into(grads.get_or_alloc_mut(&b)?, &gb);
                    Ok(())
                })
            });
        }
        Ok(y.put_tape(tape))
    }
}

#[cfg(feature = "cuda")]
impl<E: SpinDtype> DepthwiseKernel<E> for dfdx::tensor::Cuda
where
    dfdx::tensor::Cuda: Device<E>,
{
    fn dwconv<T: Tape<E, Self> + Merge<T>>(
        x: Tensor<Nhwc, E, Self, T>,
        w: Tensor<(usize, usize), E, Self, T>,
        b: Tensor<(usize,), E, Self, T>,
        k: usize,
    ) -> Result<Tensor<Nhwc, E, Self, T>, Self::Err> {
        dwconv_fallback(x, w, b, k)
    }
}

/// Depthwise convolution from dfdx's own ops: pad, then sum K·K shifted slices scaled per channel.
/// Slower than the CPU kernel but runs on any dfdx device; tests check the two agree.
pub fn dwconv_fallback<E: SpinDtype, D: Device<E>, T: Tape<E, D> + Merge<T>>(
    x: Tensor<Nhwc, E, D, T>,
    w: Tensor<(usize, usize), E, D, T>,
    b: Tensor<(usize,), E, D, T>,
    k: usize,
) -> Result<Tensor<Nhwc, E, D, T>, D::Err> {
    let (bn, h, wd, c) = *x.shape();
    let p = k / 2;
    let dev = x.device().clone();
    let zh = dev.try_zeros_like(&(bn, p, wd, c))?;
    let x = (zh.retaped::<T>(), x).try_concat_along(Axis::<1>)?;
    let x = (x, zh.retaped::<T>()).try_concat_along(Axis::<1>)?;
    let zw = dev.try_zeros_like(&(bn, h + 2 * p, p, c))?;
    let x = (zw.retaped::<T>(), x).try_concat_along(Axis::<2>)?;
    let xp = (x, zw.retaped::<T>()).try_concat_along(Axis::<2>)?;
    let shape = (bn, h, wd, c);
    let mut acc = b
        .try_broadcast_like::<_, Axes3<0, 1, 2>>(&shape)?
        .try_add(dev.try_zeros_like(&shape)?)?;
    for ky in 0..k {
        for kx in 0..k {
            let j = ky * k + kx;
            // dfdx 0.13's slice backward assigns rather than adds, so overlapping slices of one
            // tensor would overwrite each other's gradients: slice a fresh copy (new id) each time.
            let xs = xp
                .with_empty_tape()
                .try_mul(E::one())?
                .try_slice((.., ky..ky + h, kx..kx + wd, ..))?;
            let wj = w
                .with_empty_tape()
                .try_mul(E::one())?
                .try_slice((.., j..j + 1))?
                .try_reshape_like(&(c,))?
                .try_broadcast_like::<_, Axes3<0, 1, 2>>(&shape)?;
            acc = acc.try_add(xs.try_mul(wj)?)?;
        }
    }
    // The padded input and the weight carry their own tapes; fold them in with a zero-cost touch.
    let touch_x = xp
        .try_mul(E::one())?
        .try_slice((.., 0..h, 0..wd, ..))?
        .try_mul(E::zero())?;
    let touch_w = w
        .try_mul(E::one())?
        .try_slice((.., 0..1))?
        .try_reshape_like(&(c,))?
        .try_broadcast_like::<_, Axes3<0, 1, 2>>(&shape)?
        .try_mul(E::zero())?;
    acc.try_add(touch_x)?.try_add(touch_w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_vec(dev: &Cpu, n: usize) -> Vec<f64> {
        let t: Tensor<(usize,), f64, _> = dev.sample_normal_like(&(n,));
        t.as_vec()
    }

    /// Direct 7-loop reference of a depthwise 'same' convolution on NHWC data.
    fn reference(x: &[f64], w: &[f64], b: &[f64], (bn, h, wd, c): Nhwc, k: usize) -> Vec<f64> {
        let p = k as isize / 2;
        let mut y = vec![0.0; x.len()];
        for n in 0..bn {
            for i in 0..h {
                for j in 0..wd {
                    for ch in 0..c {
                        let mut s = b[ch];
                        for ky in 0..k {
                            for kx in 0..k {
                                let (ii, jj) = (i as isize + ky as isize - p, j as isize + kx as isize - p);
                                if ii >= 0 && jj >= 0 && (ii as usize) < h && (jj as usize) < wd {
                                    s += x[((n * h + ii as usize) * wd + jj as usize) * c + ch]
                                        * w[ch * k * k + ky * k + kx];
                                }
                            }
                        }
                        y[((n * h + i) * wd + j) * c + ch] = s;
                    }
                }
            }
        }
        y
    }

    #[test]
    fn dwconv_forward_matches_direct_loops_and_fallback() {
        let dev = Cpu::seed_from_u64(0);
        let shape = (2, 5, 6, 3);
        for k in [1, 3, 5, 7] {
            let x = rand_vec(&dev, 2 * 5 * 6 * 3);
            let w = rand_vec(&dev, 3 * k * k);
            let b = rand_vec(&dev, 3);
            let want = reference(&x, &w, &b, shape, k);
            let xt = dev.tensor_from_vec(x, shape);
            let wt = dev.tensor_from_vec(w, (3, k * k));
            let bt = dev.tensor_from_vec(b, (3,));
            let got = Cpu::dwconv(xt.clone(), wt.clone(), bt.clone(), k)
                .unwrap()
                .as_vec();
            let fb = dwconv_fallback(xt, wt, bt, k).unwrap().as_vec();
            for i in 0..want.len() {
                assert!((got[i] - want[i]).abs() < 1e-12, "k={k} i={i}");
                assert!((fb[i] - want[i]).abs() < 1e-12, "fallback k={k} i={i}");
            }
        }
    }

    /// f32 takes the register-tiled kernel where the CPU has AVX-512: channels that are not a
    /// multiple of 16, rows that are not a multiple of 8 pixels, against the f64 loops (1e-4).
    #[test]
    fn f32_dwconv_matches_direct_loops_at_awkward_sizes() {
        let dev = Cpu::seed_from_u64(2);
        let shape = (2, 11, 13, 40);
        let n = 2 * 11 * 13 * 40;
        for k in [3, 9, 11] {
            let (x, w, b) = (rand_vec(&dev, n), rand_vec(&dev, 40 * k * k), rand_vec(&dev, 40));
            let want = reference(&x, &w, &b, shape, k);
            let f32s = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
            let got = Cpu::dwconv(
                dev.tensor_from_vec(f32s(&x), shape),
                dev.tensor_from_vec(f32s(&w), (40, k * k)),
                dev.tensor_from_vec(f32s(&b), (40,)),
                k,
            )
            .unwrap()
            .as_vec();
            for i in 0..want.len() {
                assert!((got[i] as f64 - want[i]).abs() < 1e-4, "k={k} i={i}");
            }
        }
    }

    /// Gradients of loss = Σ y ⊙ r (r fixed random) against central finite differences, f64.
    #[test]
    fn dwconv_gradients_match_finite_differences() {
        let dev = Cpu::seed_from_u64(1);
        let shape = (2, 4, 5, 3);
        let k = 3;
        let n = 2 * 4 * 5 * 3;
        let (x, w, b, r) = (
            rand_vec(&dev, n),
            rand_vec(&dev, 3 * k * k),
            rand_vec(&dev, 3),
            rand_vec(&dev, n),
        );
        let loss = |x: &[f64], w: &[f64], b: &[f64]| -> f64 {
            reference(x, w, b, shape, k)
                .iter()
                .zip(&r)
                .map(|(a, b)| a * b)
                .sum()
        };
        let xt = dev.tensor_from_vec(x.clone(), shape);
        let wt = dev.tensor_from_vec(w.clone(), (3, k * k));
        let bt = dev.tensor_from_vec(b.clone(), (3,));
        let rt = dev.tensor_from_vec(r.clone(), shape);
        let y = Cpu::dwconv(xt.leaky_trace(), wt.retaped(), bt.retaped(), k).unwrap();
        let g = (y * rt).sum::<(), _>().backward();
        let eps = 1e-6;
        let check = |analytic: Vec<f64>, base: &Vec<f64>, which: usize| {
            for i in 0..base.len() {
                let mut hi = base.clone();
                let mut lo = base.clone();
                hi[i] += eps;
                lo[i] -= eps;
                let f = |v: &Vec<f64>| match which {
                    0 => loss(v, &w, &b),
                    1 => loss(&x, v, &b),
                    _ => loss(&x, &w, v),
                };
                let num = (f(&hi) - f(&lo)) / (2.0 * eps);
                assert!(
                    (num - analytic[i]).abs() < 1e-6,
                    "param {which} index {i}: {num} vs {}",
                    analytic[i]
                );
            }
        };
        check(g.get(&xt).as_vec(), &x, 0);
        check(g.get(&wt).as_vec(), &w, 1);
        check(g.get(&bt).as_vec(), &b, 2);
    }

    #[test]
    fn dwconv_fallback_gradients_match_kernel() {
        let dev = Cpu::seed_from_u64(3);
        let shape = (1, 4, 4, 2);
        let x: Tensor<Nhwc, f64, _> = dev.sample_normal_like(&shape);
        let w: Tensor<(usize, usize), f64, _> = dev.sample_normal_like(&(2, 9));
        let b: Tensor<(usize,), f64, _> = dev.sample_normal_like(&(2,));
        let r: Tensor<Nhwc, f64, _> = dev.sample_normal_like(&shape);
        let ya = Cpu::dwconv(x.leaky_trace(), w.retaped(), b.retaped(), 3).unwrap();
        let ga = (ya * r.clone()).sum::<(), _>().backward();
        let yb = dwconv_fallback(x.leaky_trace(), w.retaped(), b.retaped(), 3).unwrap();
        let gb = (yb * r).sum::<(), _>().backward();
        for (p, q) in ga.get(&w).as_vec().iter().zip(gb.get(&w).as_vec()) {
            assert!((p - q).abs() < 1e-10);
        }
        for (p, q) in ga.get(&x).as_vec().iter().zip(gb.get(&x).as_vec()) {
            assert!((p - q).abs() < 1e-10);
        }
    }
}
