//! The machine's FP32 fused-multiply-add throughput, measured: what "fraction of peak" in a
//! benchmark is a fraction of. Each thread runs `CHAINS` independent accumulator vectors — more
//! than FMA latency × FMA ports, so the units never wait on a result — through `mul_add`, which
//! the AVX-512/AVX2 builds compile to vector FMAs.
use multiversion::multiversion;
use std::time::Instant;

/// Independent accumulators per thread, 16 lanes each (one AVX-512 register, two AVX2 ones).
const CHAINS: usize = 12;
const LANES: usize = 16;

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn fma_loop(iters: usize, x: f32, y: f32) -> f32 {
    // One flat array: LLVM keeps it in CHAINS vector registers (nested arrays it spilled).
    let mut acc = [1.0f32; LANES * CHAINS];
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = v.mul_add(x, y);
        }
    }
    acc.iter().sum()
}

/// The same loop on AVX-512 registers by intrinsics: compiled for a generic x86-64 target, LLVM
/// prefers 256-bit vectors even where 512-bit units exist, which would halve the probe.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn fma_loop_avx512(iters: usize, x: f32, y: f32) -> f32 {
    use std::arch::x86_64::{_mm512_fmadd_ps, _mm512_reduce_add_ps, _mm512_set1_ps};
    let (vx, vy) = (_mm512_set1_ps(x), _mm512_set1_ps(y));
    let mut acc = [_mm512_set1_ps(1.0); CHAINS];
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = _mm512_fmadd_ps(*a, vx, vy);
        }
    }
    acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
}

/// The widest FMA loop this CPU runs.
fn fma_best(iters: usize, x: f32, y: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512F (checked just above), the only requirement of a
        // `target_feature(enable = "avx512f")` function; it touches no memory but its locals.
        return unsafe { fma_loop_avx512(iters, x, y) };
    }
    fma_loop(iters, x, y)
}

/// GFLOP/s (one FMA = 2 FLOPs) of every thread of the current rayon pool running FMAs: the best
/// of timed passes of about `seconds` / 10 each, for about `seconds` in all (at least three).
/// Each thread runs its own loop (`broadcast`), so one thread never takes another's. On a shared
/// virtual machine a probe of three passes once read half the peak (as if one core were busy
/// elsewhere throughout); more passes give it more chances to see both.
pub fn fma_gflops(seconds: f64) -> f64 {
    let threads = rayon::current_num_threads();
    // Calibrate the loop length on one thread.
    let mut iters = 1 << 16;
    loop {
        let t = Instant::now();
        std::hint::black_box(fma_best(iters, std::hint::black_box(0.999_999), 1e-7));
        if t.elapsed().as_secs_f64() > seconds / 10.0 || iters > 1 << 30 {
            break;
        }
        iters *= 2;
    }
    let flops = 2.0 * (CHAINS * LANES * iters * threads) as f64;
    let start = Instant::now();
    let mut best = 0.0f64;
    for pass in 0.. {
        if pass >= 3 && start.elapsed().as_secs_f64() >= seconds {
            break;
        }
        let t = Instant::now();
        let sums: f32 = rayon::broadcast(|_| fma_best(iters, std::hint::black_box(0.999_999), 1e-7))
            .into_iter()
            .sum();
        std::hint::black_box(sums);
        best = best.max(flops / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_probe_computes_what_it_counts() {
        // x = 1, y = 1: every lane counts its iterations, so the loop was not optimised away.
        assert_eq!(
            super::fma_loop(100, 1.0, 1.0),
            (super::CHAINS * super::LANES) as f32 * 101.0
        );
    }
}
