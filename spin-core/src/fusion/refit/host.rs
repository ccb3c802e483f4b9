//! A ConvMixer on the host in f32 (channels in columns), as the refit reads, runs and writes it:
//! its tensors by their checkpoint keys, and one forward pass that keeps every activation.
use super::MixerShape;
use crate::base::BN_EPS;
use crate::checkpoint::{lookup, TensorMap};
use crate::error::Error;
use crate::kernels::elementwise::{gelu_inplace, CHUNK};
use crate::models::convmixer::keys::{self, block};
use nalgebra::DMatrix;
use rayon::prelude::*;
use spin_rules::{Act, Variant};
use std::path::Path;

/// Activations, one row per position (image-major, then row-major over the grid), one column per
/// channel: each channel's planes are contiguous.
pub(super) type Act2 = DMatrix<f32>;

/// A BatchNorm in eval mode: `(x − mean)/√(var + ε)·weight + bias`, per channel.
#[derive(Clone, Debug)]
pub(super) struct Norm {
    pub(super) mean: Vec<f32>,
    pub(super) var: Vec<f32>,
    pub(super) weight: Vec<f32>,
    pub(super) bias: Vec<f32>,
}

const NORM_PARTS: [&str; 4] = ["running_mean", "running_var", "weight", "bias"];

impl Norm {
    pub(super) fn read(map: &TensorMap, name: &str, prefix: &str, c: usize) -> Result<Self, Error> {
        let [mean, var, weight, bias] = NORM_PARTS.map(|p| get(map, name, &format!("{prefix}.{p}"), &[c]));
        Ok(Self {
            mean: mean?,
            var: var?,
            weight: weight?,
            bias: bias?,
        })
    }
    pub(super) fn write(&self, map: &mut TensorMap, prefix: &str) {
        for (p, v) in NORM_PARTS
            .iter()
            .zip([&self.mean, &self.var, &self.weight, &self.bias])
        {
            put(map, &format!("{prefix}.{p}"), v);
        }
    }
    pub(super) fn apply(&self, x: &mut Act2) {
        for (c, mut col) in x.column_iter_mut().enumerate() {
            let a = self.weight[c] / (self.var[c] + BN_EPS as f32).sqrt();
            let d = self.bias[c] - self.mean[c] * a;
            col.iter_mut().for_each(|v| *v = a * *v + d);
        }
    }
}

/// One block's tensors (a shared tensor repeated in every layer using it).
#[derive(Clone, Debug)]
pub(super) struct Block {
    /// `(C, K·K)`.
    pub(super) dw_w: DMatrix<f32>,
    pub(super) dw_b: Vec<f32>,
    pub(super) bn1: Norm,
    /// `(C, C)`, output channels in rows.
    pub(super) pw_w: DMatrix<f32>,
    pub(super) pw_b: Vec<f32>,
    pub(super) bn2: Norm,
}

/// A ConvMixer on the host: what a refit reads, changes and writes back.
#[derive(Clone, Debug)]
pub(super) struct Host {
    pub(super) stem_w: DMatrix<f32>,
    pub(super) stem_b: Vec<f32>,
    pub(super) stem_bn: Norm,
    pub(super) blocks: Vec<Block>,
    pub(super) head_w: DMatrix<f32>,
    pub(super) head_b: Vec<f32>,
}

/// A tensor of `map`, which errors call `name`.
pub(super) fn get(map: &TensorMap, name: &str, key: &str, dims: &[usize]) -> Result<Vec<f32>, Error> {
    let data = lookup(map, Path::new(name), key, dims)?;
    Ok(data.iter().map(|&v| v as f32).collect())
}

pub(super) fn put(map: &mut TensorMap, key: &str, values: &[f32]) {
    let entry = map.get_mut(key).expect("a key read before");
    entry.1 = values.iter().map(|&v| f64::from(v)).collect();
}

pub(super) fn matrix(rows: usize, cols: usize, row_major: Vec<f32>) -> DMatrix<f32> {
    DMatrix::from_row_slice(rows, cols, &row_major)
}

pub(super) fn row_major(m: &DMatrix<f32>) -> Vec<f32> {
    m.transpose().iter().copied().collect()
}

impl Host {
    pub(super) fn read(map: &TensorMap, name: &str, s: &MixerShape) -> Result<Self, Error> {
        let (c, k, p) = (s.dim, s.kernel, s.patch);
        let stem = keys::STEM_CONV;
        let mut blocks = Vec::with_capacity(s.depth);
        for i in 0..s.depth {
            let (dw, pw) = (block(i, keys::DEPTHWISE), block(i, keys::POINTWISE));
            blocks.push(Block {
                dw_w: matrix(c, k * k, get(map, name, &format!("{dw}.weight"), &[c, 1, k, k])?),
                dw_b: get(map, name, &format!("{dw}.bias"), &[c])?,
                bn1: Norm::read(map, name, &block(i, keys::NORM1), c)?,
                pw_w: matrix(c, c, get(map, name, &format!("{pw}.weight"), &[c, c, 1, 1])?),
                pw_b: get(map, name, &format!("{pw}.bias"), &[c])?,
                bn2: Norm::read(map, name, &block(i, keys::NORM2), c)?,
            });
        }
        Ok(Self {
            stem_w: matrix(
                c,
                3 * p * p,
                get(map, name, &format!("{stem}.weight"), &[c, 3, p, p])?,
            ),
            stem_b: get(map, name, &format!("{stem}.bias"), &[c])?,
            stem_bn: Norm::read(map, name, keys::STEM_NORM, c)?,
            blocks,
            head_w: matrix(
                s.classes,
                c,
                get(map, name, &format!("{}.weight", keys::HEAD), &[s.classes, c])?,
            ),
            head_b: get(map, name, &format!("{}.bias", keys::HEAD), &[s.classes])?,
        })
    }

    /// Writes the blocks and the head back (the stem is never refitted).
    pub(super) fn write(&self, map: &mut TensorMap) {
        for (i, b) in self.blocks.iter().enumerate() {
            let (dw, pw) = (block(i, keys::DEPTHWISE), block(i, keys::POINTWISE));
            put(map, &format!("{dw}.weight"), &row_major(&b.dw_w));
            put(map, &format!("{dw}.bias"), &b.dw_b);
            b.bn1.write(map, &block(i, keys::NORM1));
            put(map, &format!("{pw}.weight"), &row_major(&b.pw_w));
            put(map, &format!("{pw}.bias"), &b.pw_b);
            b.bn2.write(map, &block(i, keys::NORM2));
        }
        put(map, &format!("{}.weight", keys::HEAD), &row_major(&self.head_w));
        put(map, &format!("{}.bias", keys::HEAD), &self.head_b);
    }

    /// The stem's output for NCHW `images`.
    pub(super) fn stem(&self, s: &MixerShape, images: &[f32], n: usize) -> Act2 {
        let (p, g, img) = (s.patch, s.grid(), s.image);
        let patches = Act2::from_fn(n * g * g, 3 * p * p, |row, col| {
            let (b, y, x) = (row / (g * g), row / g % g, row % g);
            let (ch, ky, kx) = (col / (p * p), col / p % p, col % p);
            images[((b * 3 + ch) * img + y * p + ky) * img + x * p + kx]
        });
        let mut x = linear(&patches, &self.stem_w, &self.stem_b);
        activation(s.act, &mut x);
        self.stem_bn.apply(&mut x);
        x
    }
}

/// `x·Wᵀ + b`.
pub(super) fn linear(x: &Act2, w: &DMatrix<f32>, b: &[f32]) -> Act2 {
    let mut y = x * w.transpose();
    for (c, mut col) in y.column_iter_mut().enumerate() {
        col.add_scalar_mut(b[c]);
    }
    y
}

pub(super) fn activation(act: Act, x: &mut Act2) {
    match act {
        // The models' own GELU kernel, on chunks across threads.
        Act::Gelu => x.as_mut_slice().par_chunks_mut(CHUNK).for_each(gelu_inplace),
        Act::Relu => x.apply(|v| *v = v.max(0.0)),
    }
}

/// Position `row`'s K·K neighbourhood in its image's grid (PyTorch's `same` padding: the extra
/// row and column of an even kernel on the far side), `None` outside the image.
pub(super) fn neighbours(row: usize, g: usize, k: usize) -> impl Iterator<Item = Option<usize>> {
    let (base, y, x) = (row / (g * g) * g * g, (row / g % g) as isize, (row % g) as isize);
    let lo = ((k - 1) / 2) as isize;
    (0..k * k).map(move |t| {
        let (yy, xx) = (y + (t / k) as isize - lo, x + (t % k) as isize - lo);
        let inside = (0..g as isize).contains(&yy) && (0..g as isize).contains(&xx);
        inside.then(|| base + yy as usize * g + xx as usize)
    })
}

/// Every position's in-image neighbours as (tap, position), for `rows` positions: made once per
/// refit, read by every depthwise conv of every forward pass.
pub(super) type Taps = Vec<Vec<(usize, usize)>>;

pub(super) fn taps(rows: usize, g: usize, k: usize) -> Taps {
    (0..rows)
        .map(|row| {
            neighbours(row, g, k)
                .enumerate()
                .filter_map(|(t, at)| Some((t, at?)))
                .collect()
        })
        .collect()
}

pub(super) fn depthwise(x: &Act2, w: &DMatrix<f32>, b: &[f32], taps: &Taps) -> Act2 {
    let rows = x.nrows();
    let columns: Vec<Vec<f32>> = (0..x.ncols())
        .into_par_iter()
        .map(|c| {
            let src = x.column(c);
            let (src, wc) = (src.as_slice(), w.row(c).iter().copied().collect::<Vec<f32>>());
            taps.iter()
                .map(|tap| tap.iter().map(|&(t, a)| wc[t] * src[a]).sum::<f32>() + b[c])
                .collect()
        })
        .collect();
    Act2::from_iterator(rows, x.ncols(), columns.into_iter().flatten())
}

/// Every activation of one forward pass that a refit reads.
pub(super) struct Trace {
    /// Each block's input.
    pub(super) input: Vec<Act2>,
    /// The depthwise conv's output, before the activation.
    pub(super) dw_pre: Vec<Act2>,
    /// After the depthwise half-block (residual included).
    pub(super) mid: Vec<Act2>,
    /// The pointwise conv's output, before the activation.
    pub(super) pw_pre: Vec<Act2>,
    /// Each block's output.
    pub(super) output: Vec<Act2>,
    /// `(images, C)` pooled features.
    pub(super) pooled: Act2,
    /// `(images, classes)`.
    pub(super) logits: Act2,
}

pub(super) fn trace(h: &Host, s: &MixerShape, stem: &Act2, n: usize, taps: &Taps) -> Trace {
    let g = s.grid();
    let mut t = Trace {
        input: vec![],
        dw_pre: vec![],
        mid: vec![],
        pw_pre: vec![],
        output: vec![],
        pooled: Act2::zeros(0, 0),
        logits: Act2::zeros(0, 0),
    };
    let mut x = stem.clone();
    for b in &h.blocks {
        let dw_pre = depthwise(&x, &b.dw_w, &b.dw_b, taps);
        let mut y = dw_pre.clone();
        activation(s.act, &mut y);
        b.bn1.apply(&mut y);
        let mid = y + &x;
        let pw_pre = linear(&mid, &b.pw_w, &b.pw_b);
        let mut out = pw_pre.clone();
        activation(s.act, &mut out);
        b.bn2.apply(&mut out);
        if s.variant == Variant::Spin {
            out += &mid;
        }
        t.input.push(std::mem::replace(&mut x, out.clone()));
        t.dw_pre.push(dw_pre);
        t.mid.push(mid);
        t.pw_pre.push(pw_pre);
        t.output.push(out);
    }
    let per = g * g;
    t.pooled = Act2::from_fn(n, s.dim, |b, c| x.column(c).rows(b * per, per).sum() / per as f32);
    t.logits = linear(&t.pooled, &h.head_w, &h.head_b);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbourhoods_pad_as_pytorch_same() {
        // 3×3 kernel on a 4×4 grid, second image: position (0, 0) sees 4 pixels, (1, 1) all 9.
        let at = |row| neighbours(row, 4, 3).collect::<Vec<_>>();
        let corner = at(16);
        assert_eq!(corner.iter().flatten().count(), 4);
        assert_eq!(corner[4], Some(16));
        assert_eq!(corner[8], Some(21));
        assert_eq!(at(21).iter().flatten().count(), 9);
        // An even kernel reaches one further on the far side: rows y..y+1 for k = 2.
        assert_eq!(
            neighbours(0, 4, 2).collect::<Vec<_>>(),
            [Some(0), Some(1), Some(4), Some(5)]
        );
    }
}
