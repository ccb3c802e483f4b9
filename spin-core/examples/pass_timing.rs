//! Medians of spin's fused inference passes on two threads, 25 rounds each: the depthwise pass
//! (with and without its GELU epilogue) at ConvMixer-256/8's and ConvMixer-768/32's shapes, and
//! the packed products of ConvMixer's pointwise convs and DeiT's Linears. Run it on two commits,
//! alternating, to compare them: `cargo run --release -p spin-core --example pass_timing`.
use spin_core::base::Act;
use spin_core::kernels::blocks::{linear_rows, pointwise_into, HostLinear};
use spin_core::kernels::depthwise::{forward_into, DwGeometry};
use spin_core::kernels::epilogue::Epilogue;
use std::time::Instant;

/// `len` deterministic values in [−0.5, 0.5).
fn values(len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7919) % 997) as f32 / 997.0 - 0.5)
        .collect()
}

/// Median and minimum milliseconds per call of `f` over 25 rounds of `calls` calls, after one
/// round of warm-up.
fn timed(calls: usize, mut f: impl FnMut()) -> (f64, f64) {
    let mut ms: Vec<f64> = (0..26)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..calls {
                f();
            }
            t.elapsed().as_secs_f64() * 1e3 / calls as f64
        })
        .skip(1)
        .collect();
    ms.sort_by(f64::total_cmp);
    (ms[12], ms[0])
}

fn main() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("a pool of two threads");
    pool.install(|| {
        for (name, b, g, c, k, calls) in [
            ("ConvMixer-256/8 b8", 8, 16, 256, 9, 40),
            ("ConvMixer-768/32 b1", 1, 32, 768, 7, 20),
        ] {
            let x = values(b * g * g * c);
            let (dw, ones, zeros) = (values(k * k * c), vec![1.0f32; c], vec![0.0f32; c]);
            let geo = DwGeometry::new((b, g, g, c), k);
            let mut out = vec![0.0f32; x.len()];
            for act in [Some(Act::Gelu), None] {
                let epi = act.map(|act| Epilogue {
                    bias: &zeros,
                    scale: &ones,
                    shift: &zeros,
                    act,
                });
                let (med, min) = timed(calls, || {
                    forward_into(&geo, &x, &dw, &zeros, epi.as_ref(), &mut out)
                });
                let with = if act.is_some() { "+ GELU" } else { "alone " };
                println!("{name} depthwise k{k} {with}  median {med:.3} ms, min {min:.3}");
            }
            let mut pw = HostLinear {
                wt: values(c * c),
                b: zeros.clone(),
                ..Default::default()
            };
            pw.pack();
            let epi = Epilogue {
                bias: &zeros,
                scale: &ones,
                shift: &zeros,
                act: Act::Gelu,
            };
            let (med, min) = timed(calls / 4, || pointwise_into(&x, &pw, &epi, false, &mut out));
            let gflops = 2.0 * (b * g * g * c * c) as f64 / med / 1e6;
            println!("{name} pointwise + GELU  median {med:.3} ms, min {min:.3} ({gflops:.0} GFLOP/s)");
        }
        for (name, rows, k, n, calls) in [
            ("DeiT-Small b8 qkv", 1576, 384, 1152, 5),
            ("DeiT-Small b8 fc2", 1576, 1536, 384, 5),
            ("DeiT-Tiny b1 fc2", 197, 768, 192, 100),
        ] {
            let x = values(rows * k);
            let mut l = HostLinear {
                wt: values(k * n),
                b: vec![0.0f32; n],
                ..Default::default()
            };
            l.pack();
            let mut out = vec![0.0f32; rows * n];
            let (med, min) = timed(calls, || linear_rows(&x, &l, &mut out, false));
            let gflops = 2.0 * (rows * k * n) as f64 / med / 1e6;
            println!("{name} {k}x{n}  median {med:.3} ms, min {min:.3} ({gflops:.0} GFLOP/s)");
        }
    });
}
