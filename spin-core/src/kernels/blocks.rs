//! Fused inference forwards on host buffers (ViT encoder blocks, a ConvMixer trunk) and the host
//! weights they take.
//!
//! Without a tape nothing needs to be kept for a backward pass, so a block can run as a few
//! passes over row chunks, each a rayon task that normalises its rows, multiplies them through
//! [`super::gemm`] and applies bias, activation and residual while they are still in cache —
//! instead of a dfdx op per step, several of which run on one thread. Only attention mixes rows
//! ([`super::attention`]). The model code decides when these apply
//! ([`crate::device::InferKernels`] returns `None` elsewhere) and fills the weights.
use super::attention::{attention_core, attention_rows, packed_keys};
use super::depthwise::{forward_into, DwGeometry};
use super::elementwise::{add_bias_rows, gelu_inplace};
use super::epilogue::{epilogue_rows, Epilogue};
use super::gemm::{balanced_row_chunk, matmul, row_chunk, weight_streaming_chunk, MatRef};
use super::norm::layer_norm_rows;
use super::packed::{self, PackedRhs};
use super::reuse::{give_back, overwritable};
use super::{as_f32, as_f32_mut};
use crate::base::{Act, SpinDtype};
use rayon::prelude::*;

/// A Linear layer's weight and bias on the host, the weight as `Wᵀ` `(in, out)` row-major: then
/// gemm packs it with contiguous copies, where PyTorch's `(out, in)` needs a strided gather on
/// every call (a quarter of DeiT-Tiny's inference time in the profile). A weight kept between
/// calls can be packed once for [`super::packed`] instead ([`HostLinear::pack`]).
#[derive(Clone, Debug, Default)]
pub struct HostLinear<E> {
    /// The weight as `Wᵀ`, `(in, out)` row-major (empty once packed).
    pub wt: Vec<E>,
    /// The bias, `(out,)`.
    pub b: Vec<E>,
    /// The weight packed for [`super::packed::linear_packed`], where [`HostLinear::pack`] did.
    pub packed: PackedRhs,
}

impl<E: SpinDtype> HostLinear<E> {
    /// The weight as the `(in, out)` right-hand side of `x · Wᵀ`.
    pub fn rhs(&self) -> MatRef<'_, E> {
        assert!(!self.packed.is_packed(), "HostLinear::rhs: the weight was packed");
        let out = self.b.len();
        MatRef::row_major(&self.wt, self.wt.len() / out.max(1), out)
    }

    /// Input features.
    pub fn inputs(&self) -> usize {
        if self.packed.is_packed() {
            self.packed.k()
        } else {
            self.wt.len() / self.b.len().max(1)
        }
    }

    /// Packs a weight kept between calls for [`super::packed`] where it runs (f32 on AVX-512;
    /// split for AMX tiles where they are available), dropping `wt`; elsewhere leaves the layer
    /// as it is.
    pub fn pack(&mut self) {
        self.pack_with(PackedRhs::pack_kept);
    }

    /// [`HostLinear::pack`] for a layer used in one call only (a training step's): always the
    /// AVX-512 kernel's panels. Splitting for AMX costs more than packing, and with every product
    /// of a training step on tiles (weights split per call) ConvMixer-256's b32 step ran 13–18 %
    /// slower and DeiT-Tiny's b8 step no faster.
    pub fn pack_for_one_call(&mut self) {
        self.pack_with(PackedRhs::pack);
    }

    fn pack_with(&mut self, pack: fn(&[f32], usize, usize) -> PackedRhs) {
        let has_weight = !self.wt.is_empty() && !self.b.is_empty();
        if !super::f32_avx512::<E>() || !has_weight {
            return;
        }
        let n = self.b.len();
        self.packed = pack(as_f32(&self.wt), self.wt.len() / n, n);
        self.wt = Vec::new();
    }
}

/// One pre-norm encoder block's weights on the host.
#[derive(Clone, Debug, Default)]
pub struct VitBlockHost<E> {
    /// LayerNorm 1's scale and shift.
    pub norm1: (Vec<E>, Vec<E>),
    /// The qkv projection.
    pub qkv: HostLinear<E>,
    /// The output projection.
    pub proj: HostLinear<E>,
    /// LayerNorm 2's scale and shift.
    pub norm2: (Vec<E>, Vec<E>),
    /// The MLP's first Linear.
    pub fc1: HostLinear<E>,
    /// The MLP's second Linear.
    pub fc2: HostLinear<E>,
}

impl<E: SpinDtype> VitBlockHost<E> {
    /// Packs the four Linear layers' weights once ([`HostLinear::pack`]).
    pub fn pack(&mut self) {
        for l in [&mut self.qkv, &mut self.proj, &mut self.fc1, &mut self.fc2] {
            l.pack();
        }
    }
}

/// Buffers reused from block to block: a block's zero-filled temporaries would otherwise be
/// requested and cleared again in every block (about 1 % of DeiT-Tiny's forward pass).
struct VitScratch<E> {
    /// This block's q, k and v, `(rows, 3·d)`.
    qkv: Vec<E>,
    /// The next block's, where its LN1 and qkv run in this block's pass (written while other
    /// chunks still read this block's); otherwise empty.
    next_qkv: Vec<E>,
    attn: Vec<E>,
    /// Normalised rows, `(rows, d)`.
    normed: Vec<E>,
    /// The MLP's hidden rows, `(rows, hidden)`.
    hidden: Vec<E>,
}

/// timm encoder blocks at inference, one after the other, in place on `x` `(batch·n, d)`: each
/// `x += proj(attn(LN1(x)))`, then `x += fc2(GELU(fc1(LN2(x))))`.
///
/// At small batches, one pass over row chunks per block: a chunk runs its attention rows, the
/// projection, the MLP and then the next block's LN1 and qkv, all row-local, so the only barrier
/// between blocks is the packing of the next keys (DeiT-Tiny b1 about 1 % faster than with a
/// separate LN1 + qkv pass). Panics unless every block has the first one's sizes.
pub fn vit_blocks<E: SpinDtype>(x: &mut [E], blocks: &[VitBlockHost<E>], batch: usize, heads: usize) {
    let Some(first) = blocks.first() else {
        return;
    };
    let (d, hidden) = (first.norm1.0.len(), first.fc1.b.len());
    assert!(
        blocks
            .iter()
            .all(|w| w.norm1.0.len() == d && w.fc1.b.len() == hidden),
        "vit_blocks: blocks of different sizes"
    );
    let rows = x.len() / d;
    // Each chunk reads all of a block's weights (4.7 MB at DeiT-Small) from L3, so at large
    // batches two chunks per thread rather than 128-row ones (DeiT-Small b8 on an AMD Zen 4:
    // faster than one chunk per thread or 128-row ones in three alternations, level in a fourth).
    // AMX keeps 128-row chunks, whole 32-row tiles (uneven ones cost its forward 10 % before).
    let chunk = if first.fc1.packed.on_amx() {
        row_chunk(rows)
    } else {
        row_chunk(rows).max(weight_streaming_chunk(rows, 2))
    };
    // The epilogue's scale and shift for fc1's GELU alone.
    let identity = (vec![1.0f32; hidden], vec![0.0f32; hidden]);
    // Every buffer is overwritten whole before it is read, so they are kept from call to call
    // (zero-filled per call, `memset` was 1.1 % of DeiT-Tiny b1's samples).
    let mut s = VitScratch {
        qkv: overwritable(rows * 3 * d),
        next_qkv: Vec::new(),
        attn: overwritable(rows * d),
        normed: overwritable(rows * d),
        hidden: overwritable(rows * hidden),
    };

    // LN1 and qkv of block `w` over all rows, into `out`.
    let qkv_pass = |x: &[E], w: &VitBlockHost<E>, out: &mut [E], normed: &mut [E]| {
        out.par_chunks_mut(chunk * 3 * d)
            .zip(x.par_chunks(chunk * d))
            .zip(normed.par_chunks_mut(chunk * d))
            .for_each(|((qkv, xs), z)| {
                layer_norm_rows(z, xs, &w.norm1.0, &w.norm1.1);
                linear_into(qkv, z, xs.len() / d, &w.qkv, false);
            });
    };
    qkv_pass(x, first, &mut s.qkv, &mut s.normed);
    // With one chunk per thread (small batches) the next block's LN1 and qkv join the row pass;
    // with more, each chunk would cycle through all four weights (1.8 MB at DeiT-Small) and
    // evict them from L2 (DeiT-Small b8 4–5 % slower), so they keep a pass of their own.
    // (Unfused, qkv is rewritten in place: alternating two buffers was also slower there.)
    let chunks = rows.div_ceil(chunk);
    let fuse_next = blocks.len() > 1 && chunks <= rayon::current_num_threads();
    if fuse_next {
        s.next_qkv = overwritable(rows * 3 * d);
    }

    for (i, w) in blocks.iter().enumerate() {
        let next = blocks.get(i + 1);
        // The fused attention kernel runs per chunk of query rows in the pass below; elsewhere
        // the attention is a pass of its own.
        let keys = packed_keys(&s.qkv, batch, heads, d);
        if keys.is_none() {
            attention_core(&s.qkv, &mut s.attn, batch, heads, d);
        }
        let qkv = &s.qkv;
        let next_qkv: Vec<&mut [E]> = match fuse_next {
            true => s.next_qkv.chunks_mut(chunk * 3 * d).collect(),
            false => (0..chunks).map(|_| Default::default()).collect(),
        };
        x.par_chunks_mut(chunk * d)
            .zip(s.attn.par_chunks_mut(chunk * d))
            .zip(s.normed.par_chunks_mut(chunk * d))
            .zip(s.hidden.par_chunks_mut(chunk * hidden))
            .zip(next_qkv)
            .enumerate()
            .for_each(|(i, ((((xs, a), z), h), next_qkv))| {
                let r = xs.len() / d;
                if let Some(keys) = &keys {
                    let span = i * chunk..i * chunk + r;
                    let shape = (rows / batch, heads, d);
                    attention_rows(qkv, keys, shape, span, a);
                }
                linear_into(xs, a, r, &w.proj, true);
                layer_norm_rows(z, xs, &w.norm2.0, &w.norm2.1);
                linear_gelu_into(h, z, r, &w.fc1, &identity);
                linear_into(xs, h, r, &w.fc2, true);
                if let Some(n) = next.filter(|_| fuse_next) {
                    layer_norm_rows(z, xs, &n.norm1.0, &n.norm1.1);
                    linear_into(next_qkv, z, r, &n.qkv, false);
                }
            });
        match next {
            Some(_) if fuse_next => std::mem::swap(&mut s.qkv, &mut s.next_qkv),
            Some(n) => qkv_pass(x, n, &mut s.qkv, &mut s.normed),
            None => {}
        }
    }
    for v in [s.qkv, s.next_qkv, s.attn, s.normed, s.hidden] {
        give_back(v);
    }
}

/// `out = x · Wᵀ + b`, or `out += …` when `accumulate`, over all rows of `x`, split across threads.
pub fn linear_rows<E: SpinDtype>(x: &[E], l: &HostLinear<E>, out: &mut [E], accumulate: bool) {
    let (k, n) = (l.inputs(), l.b.len());
    let rows = x.len() / k.max(1);
    let chunk = if l.packed.on_amx() {
        row_chunk(rows)
    } else {
        balanced_row_chunk(rows)
    };
    out.par_chunks_mut(chunk * n)
        .zip(x.par_chunks(chunk * k))
        .for_each(|(o, xs)| linear_into(o, xs, xs.len() / k, l, accumulate));
}

/// `out = GELU(x · Wᵀ + b)` for `r` rows; `identity` is a scale of ones and a shift of zeros,
/// one per output. On a packed weight the GELU runs on the microkernel's registers: a pass of
/// its own over the hidden rows was 1.3 % of DeiT-Small b8's samples.
fn linear_gelu_into<E: SpinDtype>(
    out: &mut [E],
    x: &[E],
    r: usize,
    l: &HostLinear<E>,
    identity: &(Vec<f32>, Vec<f32>),
) {
    if l.packed.is_packed() {
        let epi = Epilogue {
            bias: as_f32(&l.b),
            scale: &identity.0,
            shift: &identity.1,
            act: Act::Gelu,
        };
        let lhs = packed::Lhs::rows(as_f32(x), r, l.packed.k());
        packed::matmul_packed_epilogue(as_f32_mut(out), lhs, &l.packed, &epi, None);
        return;
    }
    linear_into(out, x, r, l, false);
    gelu_inplace(out);
}

/// `out (= or +=) x · Wᵀ + b` for `r` rows.
pub fn linear_into<E: SpinDtype>(out: &mut [E], x: &[E], r: usize, l: &HostLinear<E>, accumulate: bool) {
    if l.packed.is_packed() {
        assert_eq!(x.len(), r * l.packed.k(), "linear_into: input rows");
        packed::linear_packed(as_f32_mut(out), as_f32(x), &l.packed, as_f32(&l.b), accumulate);
        return;
    }
    let rhs = l.rhs();
    let n = rhs.cols;
    matmul(
        out,
        n,
        MatRef::row_major(x, r, rhs.rows),
        rhs,
        E::one(),
        accumulate,
    );
    add_bias_rows(out, &l.b);
}

/// A ConvMixer trunk's inference weights on the host, each parameter group once (a shared
/// pointwise weight is kept, and packed, one time for all its blocks), and the groups each block
/// uses.
#[derive(Clone, Debug, Default)]
pub struct MixerTrunkHost<E> {
    /// Per depthwise group: the kernel as `(K·K, C)` and the bias.
    pub dw: Vec<(Vec<E>, Vec<E>)>,
    /// Per norm group: both BatchNorms, each folded into a scale and shift.
    pub norms: Vec<[(Vec<E>, Vec<E>); 2]>,
    /// Per pointwise group: the pointwise conv (packed where [`HostLinear::pack`] runs).
    pub pw: Vec<HostLinear<E>>,
    /// Block i's (depthwise, norm, pointwise) groups.
    pub slots: Vec<[usize; 3]>,
    /// The activation.
    pub act: Act,
}

/// The largest weight [`pointwise_into`] lets every small task read (and on gemm's path pack)
/// for itself.
const PACK_IN_L2_BYTES: usize = 512 * 1024;

/// A ConvMixer pointwise half at inference, into `out`: `act(x · Wᵀ + b)·s + t` (BatchNorm
/// folded into the epilogue's scale and shift), plus `x` when `residual`. `x` is `(rows, C)`.
pub fn pointwise_into<E: SpinDtype>(
    x: &[E],
    l: &HostLinear<E>,
    epi: &Epilogue<'_, E>,
    residual: bool,
    out: &mut [E],
) {
    let c = l.b.len();
    let rows = x.len() / c;
    // While W fits in L2, small tasks keep their rows there too; a larger W (ConvMixer-768's is
    // 2.4 MB) is read from L3 by every task, and on gemm's path packed by every task, so the
    // rows go as one task per thread (up to `weight_streaming_chunk`'s bound).
    let chunk = if c * c * std::mem::size_of::<E>() <= PACK_IN_L2_BYTES {
        row_chunk(rows)
    } else {
        weight_streaming_chunk(rows, 1)
    };
    if l.packed.is_packed() {
        // The weight is packed once for all tasks (small tasks cost nothing extra), and the
        // epilogue runs on the microkernel's registers.
        let epi = Epilogue {
            bias: as_f32(epi.bias),
            scale: as_f32(epi.scale),
            shift: as_f32(epi.shift),
            act: epi.act,
        };
        out.par_chunks_mut(chunk * c)
            .zip(x.par_chunks(chunk * c))
            .for_each(|(ys, xs)| {
                let xs = as_f32(xs);
                let lhs = packed::Lhs::rows(xs, xs.len() / c, c);
                packed::matmul_packed_epilogue(as_f32_mut(ys), lhs, &l.packed, &epi, residual.then_some(xs));
            });
        return;
    }
    out.par_chunks_mut(chunk * c)
        .zip(x.par_chunks(chunk * c))
        .for_each(|(ys, xs)| {
            let r = xs.len() / c;
            matmul(ys, c, MatRef::row_major(xs, r, c), l.rhs(), E::one(), false);
            epilogue_rows(ys, epi, residual.then_some(xs));
        });
}

/// The most bytes of activations (a group's input and its depthwise output) that
/// [`mixer_trunk`] keeps on one thread from block to block: they stay in its L2.
const GROUP_IN_L2_BYTES: usize = 1 << 20;

/// A ConvMixer trunk at inference, in place on `x` `(B·G·G, C)` with `(b, g, k)` = (images,
/// grid side, kernel size), one block per entry of `w.slots`. Each block is two fused passes:
/// depthwise + bias + act + folded BN + residual, then [`pointwise_into`] (with a residual for
/// SPIN's variant).
///
/// Where there are at least as many images as threads and two images' activations fit in L2
/// (ConvMixer-256 at 32², not ConvMixer-768 at 224²), each task runs all blocks on a group of
/// two images (or one), so the group's activations stay in one core's L2 from block to block
/// instead of crossing between cores at every pass (ConvMixer-256 b8 12.0–12.8 → 10.8–10.9 ms,
/// b32 level to 3 % faster; one image per task was 4 % slower than two).
pub fn mixer_trunk<E: SpinDtype>(
    x: &mut [E],
    (b, g, k): (usize, usize, usize),
    w: &MixerTrunkHost<E>,
    pw_residual: bool,
) {
    let image = x.len() / b.max(1);
    let group_bytes = |images: usize| 2 * images * image * std::mem::size_of::<E>();
    let per_task = [2, 1]
        .into_iter()
        .find(|&n| b >= n * rayon::current_num_threads() && group_bytes(n) <= GROUP_IN_L2_BYTES);
    match per_task {
        Some(n) if b > 1 => x
            .par_chunks_mut(n * image)
            .for_each(|xs| blocks_pass(xs, (xs.len() / image, g, k), w, pw_residual)),
        _ => blocks_pass(x, (b, g, k), w, pw_residual),
    }
}

/// [`mixer_trunk`]'s blocks on all of `x`'s images, each pass split across threads.
fn blocks_pass<E: SpinDtype>(
    x: &mut [E],
    (b, g, k): (usize, usize, usize),
    w: &MixerTrunkHost<E>,
    pw_residual: bool,
) {
    let c = x.len() / (b * g * g).max(1);
    let geo = DwGeometry::new((b, g, g, c), k);
    // Overwritten whole by every depthwise pass, so kept from call to call (zero-filled per
    // call, `memset` was 0.9 % of ConvMixer-256 b8's samples).
    let mut ys = overwritable(x.len());
    for &[jd, jn, jp] in &w.slots {
        let ((dw_wt, dw_bias), [bn1, bn2], pw) = (&w.dw[jd], &w.norms[jn], &w.pw[jp]);
        let epi = Epilogue {
            bias: dw_bias,
            scale: &bn1.0,
            shift: &bn1.1,
            act: w.act,
        };
        forward_into(&geo, x, dw_wt, dw_bias, Some(&epi), &mut ys);
        let epi = Epilogue {
            bias: &pw.b,
            scale: &bn2.0,
            shift: &bn2.1,
            act: w.act,
        };
        pointwise_into(&ys, pw, &epi, pw_residual, x);
    }
    give_back(ys);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `len` deterministic values in [−0.5, 0.5), different for each seed.
    fn v(len: usize, seed: usize) -> Vec<f64> {
        crate::kernels::test_values(len, seed)
    }

    fn linear<E: SpinDtype>(inp: usize, out: usize, seed: usize) -> HostLinear<E> {
        let cast = |v: Vec<f64>| v.into_iter().map(E::cast).collect();
        HostLinear {
            wt: cast(v(inp * out, seed)),
            b: cast(v(out, seed + 1)),
            packed: Default::default(),
        }
    }

    fn block<E: SpinDtype>(d: usize, seed: usize) -> VitBlockHost<E> {
        let cast = |v: Vec<f64>| v.into_iter().map(E::cast).collect::<Vec<E>>();
        VitBlockHost {
            norm1: (cast(v(d, seed + 1)), cast(v(d, seed + 2))),
            qkv: linear(d, 3 * d, seed + 3),
            proj: linear(d, d, seed + 5),
            norm2: (cast(v(d, seed + 7)), cast(v(d, seed + 8))),
            fc1: linear(d, 4 * d, seed + 9),
            fc2: linear(4 * d, d, seed + 11),
        }
    }

    /// Two f32 encoder blocks in one call (packed weights; on AVX-512 the attention tiles run
    /// inside the row pass, on row chunks that start inside an image) against the same blocks in
    /// f64 (gemm and the portable attention), one call per block, every output within 1e-5 of
    /// the largest; 2 heads of 16. Three images of 26 tokens on two threads (two chunks of 39
    /// rows: the second block's LN1 and qkv run in the first block's pass), then six on one
    /// thread (chunks of 128 and 28 rows: they get a pass of their own).
    #[test]
    fn f32_blocks_match_the_f64_blocks() {
        let (n, d, heads) = (26, 32, 2);
        for (batch, threads) in [(3, 2), (6, 1)] {
            let x = v(batch * n * d, 13).iter().map(|a| a * 4.0).collect::<Vec<f64>>();
            let mut want = x.clone();
            for seed in [0, 20] {
                vit_blocks(&mut want, &[block::<f64>(d, seed)], batch, heads);
            }
            let mut w32 = [block::<f32>(d, 0), block::<f32>(d, 20)];
            for w in &mut w32 {
                w.pack();
            }
            let mut got: Vec<f32> = x.iter().map(|&a| a as f32).collect();
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| vit_blocks(&mut got, &w32, batch, heads));
            let scale = want.iter().fold(0.0f64, |m, a| m.max(a.abs()));
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g as f64 - w).abs() < 1e-5 * scale,
                    "batch {batch}, value {i}: {g} vs {w}"
                );
            }
        }
    }
}
