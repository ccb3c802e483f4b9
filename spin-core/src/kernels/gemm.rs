//! Matrix products and transposes on host buffers, for the fused inference blocks and the Linear op.
//!
//! dfdx 0.13 multiplies through gemm 0.15, whose AVX-512 kernels need a nightly compiler; the
//! `gemm` crate's current release has them on stable. [`matmul`] is single-threaded: its callers
//! split rows across rayon tasks and keep each task's data in cache between the product and its
//! epilogue. [`par_matmul`] and [`par_matmul_tn`] do that split for plain products.
use crate::base::SpinDtype;
use std::any::TypeId;

/// A read-only strided matrix: element (i, j) is `data[i·rs + j·cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a, E> {
    /// The buffer.
    pub data: &'a [E],
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Distance between rows, in elements.
    pub rs: usize,
    /// Distance between columns, in elements.
    pub cs: usize,
}

impl<'a, E> MatRef<'a, E> {
    /// A dense row-major `rows × cols` matrix.
    pub fn row_major(data: &'a [E], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols)
    }

    /// Rows of `cols` elements, `rs` apart (a column block of a wider matrix).
    pub fn strided(data: &'a [E], rows: usize, cols: usize, rs: usize) -> Self {
        let m = Self {
            data,
            rows,
            cols,
            rs,
            cs: 1,
        };
        m.check();
        m
    }

    /// The transpose, without moving data.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    fn check(&self) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.rs + (self.cols - 1) * self.cs;
            assert!(last < self.data.len(), "matrix view runs past its buffer");
        }
    }
}

/// `src` `(rows, cols)` row-major → `dst` `(cols, rows)`: 8×8 tiles (moved through registers,
/// which the compiler turns into vector shuffles) within bands of 32 output rows, the bands split
/// across threads.
pub fn transpose_into<E: Copy + Send + Sync + 'static>(
    dst: &mut Vec<E>,
    src: &[E],
    rows: usize,
    cols: usize,
) {
    use rayon::prelude::*;
    const BAND: usize = 32;
    assert_eq!(src.len(), rows * cols, "transpose: buffer is not rows × cols");
    if src.is_empty() {
        dst.clear();
        return;
    }
    // Every slot is written below; filling first keeps this safe code.
    dst.resize(src.len(), src[0]);
    dst.par_chunks_mut(BAND * rows)
        .enumerate()
        .for_each(|(band, out)| {
            transpose_band(out, src, rows, cols, band * BAND);
        });
}

/// Output rows `j0..j0 + out.len()/rows` of the transpose (source columns `j0..`).
fn transpose_band<E: Copy + 'static>(out: &mut [E], src: &[E], rows: usize, cols: usize, j0: usize) {
    const T: usize = 8;
    let jn = out.len() / rows;
    let (full_i, full_j) = (rows / T * T, jn / T * T);
    #[cfg(target_arch = "x86_64")]
    let avx = TypeId::of::<E>() == TypeId::of::<f32>() && std::arch::is_x86_feature_detected!("avx");
    #[cfg(not(target_arch = "x86_64"))]
    let avx = false;
    for i0 in (0..full_i).step_by(T) {
        for dj0 in (0..full_j).step_by(T) {
            let s0 = (i0 * cols + j0 + dj0, cols);
            let d0 = (dj0 * rows + i0, rows);
            assert!(s0.0 + (T - 1) * cols + T <= src.len() && d0.0 + (T - 1) * rows + T <= out.len());
            if avx {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: E is f32 (checked above), AVX is present, and the 8×8 tiles lie inside
                // `src` and `out` (asserted).
                unsafe {
                    tile8_avx(
                        src.as_ptr().add(s0.0) as *const f32,
                        s0.1,
                        out.as_mut_ptr().add(d0.0) as *mut f32,
                        d0.1,
                    );
                }
            } else {
                for b in 0..T {
                    for a in 0..T {
                        out[d0.0 + b * rows + a] = src[s0.0 + a * cols + b];
                    }
                }
            }
        }
    }
    // Edges: the rows and columns the tiles did not cover.
    for i in 0..rows {
        let from = if i < full_i { full_j } else { 0 };
        for dj in from..jn {
            out[dj * rows + i] = src[i * cols + j0 + dj];
        }
    }
}

/// An 8×8 f32 transpose in AVX registers: unpack pairs, shuffle quads, swap 128-bit halves.
///
/// # Safety
/// The CPU must support AVX; `src + i·lds .. + 8` must be readable and `dst + i·ldd .. + 8`
/// writable for i in 0..8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn tile8_avx(src: *const f32, lds: usize, dst: *mut f32, ldd: usize) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract: AVX is present and the eight rows read and written lie
    // inside the two buffers.
    unsafe {
        let r = |i: usize| _mm256_loadu_ps(src.add(i * lds));
        let (r0, r1, r2, r3, r4, r5, r6, r7) = (r(0), r(1), r(2), r(3), r(4), r(5), r(6), r(7));
        let (t0, t1) = (_mm256_unpacklo_ps(r0, r1), _mm256_unpackhi_ps(r0, r1));
        let (t2, t3) = (_mm256_unpacklo_ps(r2, r3), _mm256_unpackhi_ps(r2, r3));
        let (t4, t5) = (_mm256_unpacklo_ps(r4, r5), _mm256_unpackhi_ps(r4, r5));
        let (t6, t7) = (_mm256_unpacklo_ps(r6, r7), _mm256_unpackhi_ps(r6, r7));
        let (u0, u1) = (
            _mm256_shuffle_ps::<0x44>(t0, t2),
            _mm256_shuffle_ps::<0xEE>(t0, t2),
        );
        let (u2, u3) = (
            _mm256_shuffle_ps::<0x44>(t1, t3),
            _mm256_shuffle_ps::<0xEE>(t1, t3),
        );
        let (u4, u5) = (
            _mm256_shuffle_ps::<0x44>(t4, t6),
            _mm256_shuffle_ps::<0xEE>(t4, t6),
        );
        let (u6, u7) = (
            _mm256_shuffle_ps::<0x44>(t5, t7),
            _mm256_shuffle_ps::<0xEE>(t5, t7),
        );
        let w = |i: usize, v: __m256| _mm256_storeu_ps(dst.add(i * ldd), v);
        w(0, _mm256_permute2f128_ps::<0x20>(u0, u4));
        w(1, _mm256_permute2f128_ps::<0x20>(u1, u5));
        w(2, _mm256_permute2f128_ps::<0x20>(u2, u6));
        w(3, _mm256_permute2f128_ps::<0x20>(u3, u7));
        w(4, _mm256_permute2f128_ps::<0x31>(u0, u4));
        w(5, _mm256_permute2f128_ps::<0x31>(u1, u5));
        w(6, _mm256_permute2f128_ps::<0x31>(u2, u6));
        w(7, _mm256_permute2f128_ps::<0x31>(u3, u7));
    }
}

/// Whether [`matmul`] has optimised kernels for `E` (f32, f64); other dtypes take a plain loop.
pub fn has_kernels<E: 'static>() -> bool {
    let id = TypeId::of::<E>();
    id == TypeId::of::<f32>() || id == TypeId::of::<f64>()
}

/// `dst = a · b · scale`, or `dst += a · b · scale` when `accumulate`; `dst` is `a.rows × b.cols`
/// with rows `ldd` apart.
pub fn matmul<E: SpinDtype>(
    dst: &mut [E],
    ldd: usize,
    a: MatRef<E>,
    b: MatRef<E>,
    scale: E,
    accumulate: bool,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "matmul: inner dimensions differ");
    if m == 0 || n == 0 {
        return;
    }
    assert!((m - 1) * ldd + n <= dst.len(), "matmul: destination too small");
    a.check();
    b.check();
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * ldd..r * ldd + n].fill(E::zero());
            }
        }
        return;
    }
    if has_kernels::<E>() {
        // SAFETY: every index gemm touches lies inside the checked views and destination, the
        // destination does not alias the inputs (it is a `&mut`), and E is one of gemm's types.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                1,
                ldd as isize,
                accumulate,
                a.data.as_ptr(),
                a.cs as isize,
                a.rs as isize,
                b.data.as_ptr(),
                b.cs as isize,
                b.rs as isize,
                E::one(),
                scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        return;
    }
    // Other dtypes (f16): a plain loop accumulating in f64.
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0;
            for l in 0..k {
                s += a.data[i * a.rs + l * a.cs].as_f64() * b.data[l * b.rs + j * b.cs].as_f64();
            }
            let o = &mut dst[i * ldd + j];
            let v = s * scale.as_f64();
            *o = E::cast(if accumulate { o.as_f64() + v } else { v });
        }
    }
}

/// Rows per task of a row-wise pass: one task per thread when rows are few (every task packs the
/// whole right-hand matrix for gemm, so smaller tasks cost more), at most 128 rows so that a
/// task's rows (and a ViT's MLP hidden activations) stay in L2.
pub(crate) fn row_chunk(rows: usize) -> usize {
    rows.div_ceil(rayon::current_num_threads()).clamp(8, 128)
}

/// Rows per task where each task reads a weight too large for L2 (from L3, once per task):
/// `per_thread` equal tasks for each thread, where those have at most [`STREAMING_ROWS`] rows;
/// otherwise [`row_chunk`]'s. ConvMixer-768's 2.4 MB pointwise weight, read by 8 tasks of 128
/// rows at batch 1, ran its forward 4–10 % slower on an AMD Zen 4 (1 MiB L2) than with one task
/// per thread.
pub(crate) fn weight_streaming_chunk(rows: usize, per_thread: usize) -> usize {
    let chunk = rows
        .div_ceil(rayon::current_num_threads().max(1) * per_thread.max(1))
        .max(8);
    if chunk <= STREAMING_ROWS {
        chunk
    } else {
        row_chunk(rows)
    }
}

/// The most rows of a [`weight_streaming_chunk`] task. Larger tasks lose more than the weight's
/// reads save: a task's outputs, rewritten once per block of the inner dimension, and its block
/// of x leave L2. ConvMixer-768/32 at batch 8 took 1.73 and 1.67 s with 128-row tasks, 2.12 and
/// 2.24 s with 4096-row ones (one per thread), 1.75 and 2.00 s with 512-row ones.
const STREAMING_ROWS: usize = 512;

/// Rows per task of equal tasks, at most 128 rows each, their count a multiple of the threads:
/// DeiT's 1576 rows (batch 8) as 14 tasks of 113 rather than 12 of 128 and one of 40, which left
/// one of two threads a task longer than the other. For the AVX-512 kernel, whose 8-row tiles
/// make a 113-row task's short tile cheap (AMX's 32-row tiles keep [`row_chunk`]).
pub(crate) fn balanced_row_chunk(rows: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let tasks = rows.div_ceil(128).next_multiple_of(threads);
    rows.div_ceil(tasks).max(1)
}

/// `a · b` for a row-major `a` `(rows, b.rows)`, into `out` `(rows, b.cols)`, rows split across
/// threads (`row_chunk`).
pub fn par_matmul<E: SpinDtype>(a: &[E], b: MatRef<E>, out: &mut [E]) {
    use rayon::prelude::*;
    let (k, n) = (b.rows, b.cols);
    let rows = a.len() / k.max(1);
    assert_eq!(out.len(), rows * n, "par_matmul: output size");
    let chunk = row_chunk(rows);
    out.par_chunks_mut(chunk * n)
        .zip(a.par_chunks(chunk * k))
        .for_each(|(o, a)| matmul(o, n, MatRef::row_major(a, a.len() / k, k), b, E::one(), false));
}

/// `aᵀ · b` for row-major `a` `(rows, m)` and `b` `(rows, n)`: `(m, n)`, blocks of output rows
/// split across threads (a weight gradient: gyᵀ · x).
pub fn par_matmul_tn<E: SpinDtype>(a: &[E], m: usize, b: &[E], n: usize) -> Vec<E> {
    use rayon::prelude::*;
    let rows = a.len() / m.max(1);
    assert_eq!(b.len(), rows * n, "par_matmul_tn: row counts differ");
    let mut out = vec![E::zero(); m * n];
    let block = m.div_ceil(2 * rayon::current_num_threads()).clamp(16, 256);
    out.par_chunks_mut(block * n).enumerate().for_each(|(i, o)| {
        let m0 = i * block;
        let mb = o.len() / n;
        let at = MatRef::strided(&a[m0..], rows, mb, m).t();
        matmul(o, n, at, MatRef::row_major(b, rows, n), E::one(), false);
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &MatRef<f64>, b: &MatRef<f64>) -> Vec<f64> {
        let mut out = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                for l in 0..a.cols {
                    out[i * b.cols + j] += a.data[i * a.rs + l * a.cs] * b.data[l * b.rs + j * b.cs];
                }
            }
        }
        out
    }

    #[test]
    fn weight_streaming_tasks_are_few_but_bounded() {
        // On a pool of two: ConvMixer-768's 1024 rows at batch 1 as one task per thread, DeiT's
        // 1576 at batch 8 as two each, and ConvMixer's 8192 rows at batch 8 in 128-row tasks
        // again (one task per thread there was a fifth slower).
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        pool.install(|| {
            assert_eq!(weight_streaming_chunk(1024, 1), 512);
            assert_eq!(weight_streaming_chunk(1576, 2), 394);
            assert_eq!(weight_streaming_chunk(8 * 1024, 1), 128);
            assert_eq!(weight_streaming_chunk(3, 1), 8);
        });
    }

    #[test]
    fn transpose_moves_every_element() {
        // Edges in both directions, several bands; f32 takes the AVX tiles where present.
        let (r, c) = (45, 70);
        let m: Vec<usize> = (0..r * c).collect();
        let mut t = Vec::new();
        transpose_into(&mut t, &m, r, c);
        let f: Vec<f32> = m.iter().map(|&v| v as f32).collect();
        let mut tf = Vec::new();
        transpose_into(&mut tf, &f, r, c);
        for i in 0..r {
            for j in 0..c {
                assert_eq!(t[j * r + i], m[i * c + j]);
                assert_eq!(tf[j * r + i], f[i * c + j]);
            }
        }
    }

    #[test]
    fn strided_products_match_the_definition() {
        let data: Vec<f64> = (0..40 * 30)
            .map(|i| ((i * 37) % 101) as f64 / 50.0 - 1.0)
            .collect();
        // A 7×5 column block (columns 3..8 of a 30-wide matrix) times the transpose of a 9×5 block.
        let a = MatRef::strided(&data[3..], 7, 5, 30);
        let b = MatRef::strided(&data[300..], 9, 5, 30).t();
        let want = naive(&a, &b);
        let mut got = vec![1.0; 7 * 9];
        matmul(&mut got, 9, a, b, 1.0, false);
        let mut acc = vec![1.0; 7 * 9];
        matmul(&mut acc, 9, a, b, 0.5, true);
        for i in 0..want.len() {
            assert!((got[i] - want[i]).abs() < 1e-12, "{i}: {} vs {}", got[i], want[i]);
            assert!((acc[i] - (1.0 + 0.5 * want[i])).abs() < 1e-12);
        }
        let a32: Vec<f32> = data.iter().map(|&v| v as f32).collect();
        let mut got32 = vec![0.0f32; 7 * 9];
        matmul(
            &mut got32,
            9,
            MatRef::strided(&a32[3..], 7, 5, 30),
            MatRef::strided(&a32[300..], 9, 5, 30).t(),
            1.0,
            false,
        );
        for i in 0..want.len() {
            assert!((got32[i] as f64 - want[i]).abs() < 1e-5);
        }
    }
}
