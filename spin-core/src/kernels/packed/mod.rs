//! Linear layers at inference with their weight packed once, read by an AVX-512 microkernel that
//! adds the bias (and the residual) on its registers (f32 only).
//!
//! gemm packs the whole right-hand matrix inside every call, and a ViT block's passes call it once
//! per 128-row task: at DeiT-Small's batch 8 each weight was packed 13 times per block, a tenth
//! of the forward pass. Kept weights ([`crate::device::BlockCache`]) are packed once instead, as
//! panels of [`NR`] output columns, `(k, NR)` each (the last one zero-padded); an 8 × 48 tile of
//! outputs stays in 24 registers through a block of the inner dimension. Per step it loads three
//! weight vectors and broadcasts eight inputs (eleven loads per 24 FMAs, where a 12 × 32 tile's
//! fourteen held DeiT-Small's forward about 4 % slower on an Intel machine).
use super::epilogue::Epilogue;
use rayon::prelude::*;
#[cfg(target_arch = "x86_64")]
use tile::Tile;

#[cfg(target_arch = "x86_64")]
pub mod amx;
#[cfg(target_arch = "x86_64")]
mod tile;

/// AVX-512 registers per panel row.
const NV: usize = 3;
/// Output columns per panel.
pub const NR: usize = 16 * NV;
/// Rows per microkernel tile: 8 × 3 accumulators leave registers for the weight and the input.
const MR: usize = 8;

/// A `(k, n)` right-hand matrix as panels of [`NR`] columns, each `(k, NR)` row-major, the last
/// one zero-padded; or, where [`amx::available`], split for the AMX kernel instead. Empty until
/// packed.
#[derive(Clone, Debug, Default)]
pub struct PackedRhs {
    data: Vec<f32>,
    #[cfg(target_arch = "x86_64")]
    amx: Option<amx::AmxRhs>,
    k: usize,
    n: usize,
}

impl PackedRhs {
    /// Packs a `(k, n)` row-major `Wᵀ`, panels in parallel. Every value is written once (the
    /// padding too), into memory that was not zero-filled first: the fill took as long as the
    /// copy, in every training step's weight-gradient product.
    pub fn pack(wt: &[f32], k: usize, n: usize) -> Self {
        use std::mem::MaybeUninit;
        assert_eq!(wt.len(), n * k, "pack: weight is not k × n");
        let len = n.div_ceil(NR) * k * NR;
        let mut data: Vec<f32> = Vec::with_capacity(len);
        if len > 0 {
            data.spare_capacity_mut()[..len]
                .par_chunks_mut(k * NR)
                .enumerate()
                .for_each(|(p, panel)| {
                    let cols = NR.min(n - p * NR);
                    for (kk, row) in panel.chunks_mut(NR).enumerate() {
                        let (values, padding) = row.split_at_mut(cols);
                        for (slot, &v) in values.iter_mut().zip(&wt[kk * n + p * NR..][..cols]) {
                            slot.write(v);
                        }
                        padding.fill(MaybeUninit::new(0.0));
                    }
                });
        }
        // SAFETY: the panels above cover all `len` slots (n.div_ceil(NR) panels of k rows of NR),
        // and each row's `cols` values and its padding were written.
        unsafe { data.set_len(len) };
        Self {
            data,
            k,
            n,
            ..Self::default()
        }
    }

    /// [`PackedRhs::pack`], or where [`amx::available`] the split for the AMX kernel: for a
    /// weight kept between calls (a training step's per-call packs stay on the AVX-512 kernel:
    /// see [`crate::kernels::blocks::HostLinear::pack_for_one_call`]).
    pub fn pack_kept(wt: &[f32], k: usize, n: usize) -> Self {
        #[cfg(target_arch = "x86_64")]
        if amx::available() {
            let amx = Some(amx::AmxRhs::pack(wt, k, n));
            return Self {
                amx,
                k,
                n,
                ..Self::default()
            };
        }
        Self::pack(wt, k, n)
    }

    /// Whether a weight has been packed.
    pub fn is_packed(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if self.amx.is_some() {
            return true;
        }
        !self.data.is_empty()
    }

    /// Whether the weight was split for the AMX kernel.
    pub fn on_amx(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if self.amx.is_some() {
            return true;
        }
        false
    }

    /// Inner dimension.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Output columns.
    pub fn n(&self) -> usize {
        self.n
    }
}

/// Whether [`linear_packed`] runs here: a CPU with AVX-512F.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out = x · W + bias`, or `out += x · W + bias` when `accumulate`, for `x` `(rows, k)` row-major
/// on this thread (callers split rows). Panics unless [`available`] and `w` is packed.
pub fn linear_packed(out: &mut [f32], x: &[f32], w: &PackedRhs, bias: &[f32], accumulate: bool) {
    let k = w.k;
    let rows = x.len() / k.max(1);
    assert!(x.len() == rows * k, "linear_packed: x is not rows × k");
    matmul_packed(out, Lhs::rows(x, rows, k), w, Some(bias), accumulate);
}

/// The left operand of [`matmul_packed`], `(rows, k)`: element (r, kk) at `r·rs + kk·cs`, with
/// one of the strides 1.
#[derive(Clone, Copy, Debug)]
pub struct Lhs<'a> {
    data: &'a [f32],
    rows: usize,
    k: usize,
    rs: usize,
    cs: usize,
}

impl<'a> Lhs<'a> {
    /// A row-major `(rows, k)` matrix.
    pub fn rows(data: &'a [f32], rows: usize, k: usize) -> Self {
        Self::strided(data, rows, k, k, 1)
    }

    /// `aᵀ` `(rows, k)` for `a` `(k, ld)` row-major, of whose columns it takes the first `rows`
    /// (a weight gradient's `dyᵀ`, or a block of its rows when `data` starts at that column).
    pub fn transposed(data: &'a [f32], rows: usize, k: usize, ld: usize) -> Self {
        Self::strided(data, rows, k, 1, ld)
    }

    fn strided(data: &'a [f32], rows: usize, k: usize, rs: usize, cs: usize) -> Self {
        assert!(rs == 1 || cs == 1, "Lhs: one stride must be 1");
        assert!(
            rows == 0 || k == 0 || (rows - 1) * rs + (k - 1) * cs < data.len(),
            "Lhs: {rows} × {k} with strides ({rs}, {cs}) overruns {} values",
            data.len()
        );
        Self {
            data,
            rows,
            k,
            rs,
            cs,
        }
    }
}

/// `out = x · W + bias` (bias optional), or `out += …` when `accumulate`, for `out` `(x.rows, n)`
/// row-major, on this thread. Panics unless [`available`] and `w` is packed.
pub fn matmul_packed(out: &mut [f32], x: Lhs<'_>, w: &PackedRhs, bias: Option<&[f32]>, accumulate: bool) {
    assert!(
        available() && w.is_packed(),
        "matmul_packed needs AVX-512F and a packed weight"
    );
    assert!(
        x.k == w.k && out.len() == x.rows * w.n && bias.is_none_or(|b| b.len() == w.n),
        "matmul_packed: sizes"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F is present (asserted above), and AMX where `w` was split for it; sizes
    // are checked above and inside.
    unsafe {
        match &w.amx {
            Some(a) => amx::matmul(out, x, a, w.n, bias, accumulate, (None, None)),
            None => rows_avx512(out, x, Rhs::Packed(w), bias, accumulate, (None, None), None),
        }
    }
}

/// `out = act(x · W + epi.bias)·epi.scale + epi.shift (+ skip)`: a ConvMixer pointwise conv with
/// its activation and folded BatchNorm (and SPIN's residual) applied on the registers, for `out`
/// and `skip` `(x.rows, n)` row-major, on this thread. Panics unless [`available`] and `w` is
/// packed.
pub fn matmul_packed_epilogue(
    out: &mut [f32],
    x: Lhs<'_>,
    w: &PackedRhs,
    epi: &Epilogue<'_, f32>,
    skip: Option<&[f32]>,
) {
    assert!(
        available() && w.is_packed(),
        "matmul_packed_epilogue needs AVX-512F and a packed weight"
    );
    assert!(
        x.k == w.k
            && out.len() == x.rows * w.n
            && [epi.bias, epi.scale, epi.shift].iter().all(|v| v.len() == w.n)
            && skip.is_none_or(|s| s.len() == out.len()),
        "matmul_packed_epilogue: sizes"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as in `matmul_packed`.
    unsafe {
        match &w.amx {
            Some(a) => amx::matmul(out, x, a, w.n, Some(epi.bias), false, (Some(epi), skip)),
            None => rows_avx512(
                out,
                x,
                Rhs::Packed(w),
                Some(epi.bias),
                false,
                (Some(epi), skip),
                None,
            ),
        }
    }
}

/// Inner-dimension block of a transposed `x`, which is packed per block as `(kc, MR)` tiles: a
/// panel's slice of it (36 KB) and a row tile's (6 KB) stay near L1 while the tiles pass over
/// the slice.
const KC: usize = 192;

/// The longest inner dimension a row-major `x` (read in place) takes in one block; a longer one
/// goes in equal blocks no longer than this. One block writes each output once, through the
/// epilogue, where blocks of [`KC`] read and write every output again per block; the panel's
/// slice then streams from L2, three vectors per 24 multiply-adds, which the prefetchers keep
/// up with. On an AMD Zen 4 (32 KiB L1), two threads, `examples/pass_timing.rs` before and
/// after, alternated: ConvMixer-768's pointwise conv at b1 200–211 → 217–221 GFLOP/s,
/// DeiT-Small's qkv at b8 185–199 → 204–210, DeiT-Tiny's fc2 at b1 214–215 → 221–224.
const KC_IN_PLACE: usize = 1536;

/// The inner-dimension block for `k` ([`KC`] or [`KC_IN_PLACE`]'s rule); at least 1.
fn inner_block(k: usize, transposed: bool) -> usize {
    if transposed {
        KC
    } else {
        k.div_ceil(k.div_ceil(KC_IN_PLACE).max(1)).max(1)
    }
}

/// The right-hand operand as the microkernel reads it.
#[derive(Clone, Copy)]
enum Rhs<'a> {
    /// Packed as panels ([`PackedRhs::pack`]).
    Packed(&'a PackedRhs),
    /// A row-major `(k, n)` matrix read in place, `n` a multiple of 16: each panel row is whole
    /// vectors of one matrix row.
    RowMajor { data: &'a [f32], k: usize, n: usize },
}

impl<'a> Rhs<'a> {
    /// `(k, n)`.
    fn dims(&self) -> (usize, usize) {
        match *self {
            Rhs::Packed(w) => (w.k, w.n),
            Rhs::RowMajor { k, n, .. } => (k, n),
        }
    }

    /// Panel `p`'s rows from `k0` (`kc` of them) and their stride.
    fn panel(&self, p: usize, k0: usize, kc: usize) -> (&'a [f32], usize) {
        match *self {
            Rhs::Packed(w) => (&w.data[(p * w.k + k0) * NR..][..kc * NR], NR),
            Rhs::RowMajor { data, n, .. } => (&data[k0 * n + p * NR..], n),
        }
    }
}

thread_local! {
    /// A task's transposed rows, packed per [`KC`] block as tiles of `(kc, MR)`; kept per worker
    /// and reused between calls.
    static PACKED_ROWS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Per block of the inner dimension ([`inner_block`]), every panel's slice over every MR-row
/// tile of the task; blocks after the first add onto the outputs. A transposed `x` (a weight gradient's
/// `dyᵀ`, whose inner steps are whole rows apart) is first packed per block as tiles of `(kc,
/// MR)`, so that the microkernel reads it from one stream; a row-major `x` is read in place.
/// `row_sums`, for a transposed `x`, gets each of its rows' sum over the inner dimension added on
/// (a weight gradient's bias gradient, Σ dy over the batch), summed per block while packing.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_avx512(
    out: &mut [f32],
    x: Lhs<'_>,
    w: Rhs<'_>,
    bias: Option<&[f32]>,
    accumulate: bool,
    (post, skip): (Option<&Epilogue<'_, f32>>, Option<&[f32]>),
    mut row_sums: Option<&mut [f32]>,
) {
    let ((k, n), rows) = (w.dims(), x.rows);
    assert!(x.k == k && out.len() == rows * n);
    assert!(row_sums.as_ref().is_none_or(|s| s.len() == rows && x.cs != 1));
    match w {
        Rhs::Packed(w) => assert!(w.data.len() == n.div_ceil(NR) * k * NR),
        Rhs::RowMajor { data, .. } => assert!(data.len() == k * n && n.is_multiple_of(16)),
    }
    let tiles = rows.div_ceil(MR);
    let transposed = x.cs != 1;
    // Each block's sums apart, then added on: fewer rounding steps than one running sum over the
    // whole inner dimension.
    let mut block_sums = row_sums.is_some().then(|| vec![0.0f32; rows]);
    PACKED_ROWS.with_borrow_mut(|packed| {
        if transposed {
            packed.resize(tiles * MR * KC, 0.0);
        }
        // One pass even for k = 0, which writes the bias (or leaves accumulated outputs).
        let block = inner_block(k, transposed);
        for k0 in (0..k.max(1)).step_by(block) {
            let kc = block.min(k - k0.min(k));
            if transposed {
                // Step by step of the inner dimension, so each step's `rows` values are read
                // as one run; full tiles as fixed-size copies (a `memmove` call per 8 values was
                // 2–4 % of a DeiT-Tiny training step's CPU samples).
                let full = rows / MR;
                for kk in 0..kc {
                    let src = &x.data[(k0 + kk) * x.cs..][..rows];
                    for (t, v) in src.chunks_exact(MR).enumerate() {
                        let d: &mut [f32; MR] = (&mut packed[t * MR * KC + kk * MR..][..MR])
                            .try_into()
                            .expect("MR values");
                        *d = v.try_into().expect("MR values");
                    }
                    let tail = &src[full * MR..];
                    if !tail.is_empty() {
                        packed[full * MR * KC + kk * MR..][..tail.len()].copy_from_slice(tail);
                    }
                    if let Some(sums) = block_sums.as_deref_mut() {
                        sums.iter_mut().zip(src).for_each(|(s, &v)| *s += v);
                    }
                }
                if let (Some(total), Some(block)) = (row_sums.as_deref_mut(), block_sums.as_deref_mut()) {
                    for (t, b) in total.iter_mut().zip(block) {
                        *t += std::mem::take(b);
                    }
                }
            }
            for p in 0..n.div_ceil(NR) {
                let (panel, ld) = w.panel(p, k0, kc);
                let tile = Tile {
                    panel,
                    ld,
                    bias: if k0 == 0 { bias } else { None },
                    c0: p * NR,
                    cols: NR.min(n - p * NR),
                    accumulate: accumulate || k0 > 0,
                    post: if k0 + kc == k { post } else { None },
                };
                for t in 0..tiles {
                    let (r0, mr) = (t * MR, MR.min(rows - t * MR));
                    let xs = if transposed {
                        // Rows past mr in a short tile are stale and never read (R = mr).
                        Lhs::strided(&packed[t * MR * KC..][..kc * MR], mr, kc, 1, MR)
                    } else {
                        Lhs::strided(&x.data[r0 * x.rs + k0..], mr, kc, x.rs, 1)
                    };
                    let os = &mut out[r0 * n..(r0 + mr) * n];
                    let skip = tile.post.and(skip).map(|s| &s[r0 * n..(r0 + mr) * n]);
                    // SAFETY: AVX-512F (this function's contract); `xs` and `os` hold mr rows.
                    unsafe {
                        if transposed {
                            tile.run_rows::<true>(xs, os, skip, n);
                        } else {
                            tile.run_rows::<false>(xs, os, skip, n);
                        }
                    }
                }
            }
        }
    });
}

/// `gx += dy · W`, or `gx = dy · W` unless `accumulate`: the input gradient of `y = x · Wᵀ + b`
/// with `W` `(out, in)` (already that product's `(k, n)` operand), `dy` `(rows, out)`, `gx`
/// `(rows, in)`. W is packed once for all row tasks, where gemm would pack it in every one.
/// Panics unless [`available`].
pub fn linear_grad_input(
    gy: &[f32],
    w: &[f32],
    (out, inp): (usize, usize),
    gx: &mut [f32],
    accumulate: bool,
) {
    let rows = gy.len() / out.max(1);
    assert!(
        gy.len() == rows * out && w.len() == out * inp && gx.len() == rows * inp,
        "linear_grad_input: sizes"
    );
    if rows == 0 || inp == 0 {
        return;
    }
    let w_packed = PackedRhs::pack(w, out, inp);
    let chunk = super::gemm::balanced_row_chunk(rows);
    gx.par_chunks_mut(chunk * inp)
        .zip(gy.par_chunks(chunk * out))
        .for_each(|(o, g)| {
            let g = Lhs::rows(g, g.len() / out.max(1), out);
            matmul_packed(o, g, &w_packed, None, accumulate)
        });
}

/// `gw += dyᵀ · x`: the weight gradient of `y = x · Wᵀ + b`, `dy` `(rows, out)`, `x` `(rows,
/// in)`, `gw` `(out, in)`. `dyᵀ` is packed per block of the inner dimension (inside the kernel);
/// x is read in place where `in` is a multiple of 16 (a ViT's widths), otherwise packed once.
/// In place, a panel's rows are a whole row apart instead of adjacent, but x — the layer's input,
/// kept since the forward pass and cold by now — is not read and written again first: packing it
/// took a tenth of the weight gradient's time, and DeiT-Tiny's b8 backward ran 5–9 ms faster
/// without. Tasks take blocks of W's rows. `gb` `(out,)`, when given, gets the bias's gradient
/// Σ_rows dy added on, summed while `dyᵀ` is packed (a pass of its own over dy was 1 % of a
/// DeiT-Tiny training step's CPU samples). Panics unless [`available`].
pub fn linear_grad_weight(
    gy: &[f32],
    x: &[f32],
    (out, inp): (usize, usize),
    gw: &mut [f32],
    gb: Option<&mut [f32]>,
) {
    let rows = x.len() / inp.max(1);
    assert!(
        x.len() == rows * inp
            && gy.len() == rows * out
            && gw.len() == out * inp
            && gb.as_ref().is_none_or(|b| b.len() == out),
        "linear_grad_weight: sizes"
    );
    if rows == 0 || out == 0 || inp == 0 {
        return;
    }
    let x_packed = (!inp.is_multiple_of(16)).then(|| PackedRhs::pack(x, rows, inp));
    let rhs = match &x_packed {
        Some(w) => Rhs::Packed(w),
        None => Rhs::RowMajor {
            data: x,
            k: rows,
            n: inp,
        },
    };
    assert!(available(), "linear_grad_weight needs AVX-512F");
    let block = out.div_ceil(rayon::current_num_threads()).next_multiple_of(MR);
    // Each task's slice of the bias gradient beside its block of W's rows (none without `gb`).
    let gb_blocks: Vec<Option<&mut [f32]>> = match gb {
        Some(b) => b.chunks_mut(block).map(Some).collect(),
        None => (0..out.div_ceil(block)).map(|_| None).collect(),
    };
    gw.par_chunks_mut(block * inp)
        .zip(gb_blocks)
        .enumerate()
        .for_each(|(i, (o, gb))| {
            let dy_t = Lhs::transposed(&gy[i * block..], o.len() / inp, rows, out);
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512F is present (asserted above); sizes are checked inside.
            unsafe {
                rows_avx512(o, dy_t, rhs, None, true, (None, None), gb);
            }
        });
}

#[cfg(test)]
mod tests;
