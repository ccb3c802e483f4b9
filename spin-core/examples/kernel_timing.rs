//! Times spin's CPU kernels on ConvMixer-256/8's shapes (batch 8, 16×16, 256 channels, k9), then
//! the two fused inference passes of a ConvMixer-768/32 block and DeiT-Tiny's fc1 backward (gemm
//! against the packed kernel) on two threads, DeiT-Tiny's batch-1 attention core on one, and one
//! thread's packed products on the AVX-512 kernel and on AMX tiles where the CPU has them:
//! `cargo run --release -p spin-core --example kernel_timing`.
use spin_core::device::{DepthwiseKernel, GeluKernel, NormKernels};
use spin_core::dfdx::prelude::*;
use std::time::Instant;

/// `len` deterministic values in [−0.5, 0.5).
fn values(len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7919) % 997) as f32 / 997.0 - 0.5)
        .collect()
}

/// Milliseconds per call of `f`, over 10 calls after three warm-up calls (with one, the first
/// line printed read high: the pool's threads and the buffers were still being set up).
fn ms(f: impl Fn()) -> f64 {
    for _ in 0..3 {
        f();
    }
    let t = Instant::now();
    for _ in 0..10 {
        f();
    }
    t.elapsed().as_secs_f64() * 100.0
}

fn main() {
    let dev = Cpu::seed_from_u64(0);
    let (b, h, c, k) = (8, 16, 256, 9);
    let x: Tensor<(usize, usize, usize, usize), f32, _> = dev.sample_normal_like(&(b, h, h, c));
    let w: Tensor<(usize, usize), f32, _> = dev.sample_normal_like(&(c, k * k));
    let bias: Tensor<(usize,), f32, _> = dev.sample_normal_like(&(c,));
    let m: Tensor<(usize, usize), f32, _> = dev.sample_normal_like(&(b * h * h, c));
    let pw: Tensor<(usize, usize), f32, _> = dev.sample_normal_like(&(c, c));
    println!(
        "dwconv k9      {:.2} ms",
        ms(|| drop(Cpu::dwconv(x.clone(), w.clone(), bias.clone(), k).unwrap()))
    );
    println!("gelu           {:.2} ms", ms(|| drop(Cpu::gelu(m.clone()))));
    println!(
        "affine (BN)    {:.2} ms",
        ms(|| drop(Cpu::channel_affine(m.clone(), bias.clone(), bias.clone())))
    );
    println!(
        "pointwise mm   {:.2} ms",
        ms(|| drop(m.clone().matmul(pw.clone().permute())))
    );
    println!("residual add   {:.2} ms", ms(|| drop(m.clone() + m.clone())));
    println!(
        "host copy      {:.2} ms",
        ms(|| drop(spin_core::device::host(&m)))
    );
    // DeiT-Tiny's fc1 weight (768, 192), re-laid out for gemm on every inference call.
    let fc1: Vec<f32> = (0..768 * 192).map(|i| i as f32).collect();
    let t = std::cell::RefCell::new(Vec::new());
    println!(
        "transpose fc1  {:.3} ms",
        ms(|| spin_core::kernels::gemm::transpose_into(&mut t.borrow_mut(), &fc1, 768, 192))
    );
    big_block();
    vit_attention();
    packed_products();
}

/// ConvMixer-768/32's block at batch 1 (32×32 grid, kernel 7) on the fused inference kernels, on
/// a pool of two threads: how one block's time splits between its two passes and re-laying out
/// its pointwise weight.
fn big_block() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    pool.install(big_block_on_pool);
}

/// [`big_block`]'s work, run on a pool worker (the caller then takes part in every loop).
fn big_block_on_pool() {
    use spin_core::base::Act;
    use spin_core::kernels::blocks::{pointwise_into, HostLinear};
    use spin_core::kernels::depthwise::{forward_into, DwGeometry};
    use spin_core::kernels::epilogue::Epilogue;
    let (g, c, k) = (32, 768, 7);
    let v = values;
    let (x, dw, ones, zeros) = (v(g * g * c), v(k * k * c), vec![1.0; c], vec![0.0; c]);
    let epi = Epilogue {
        bias: &zeros,
        scale: &ones,
        shift: &zeros,
        act: Act::Relu,
    };
    let geo = DwGeometry::new((1, g, g, c), k);
    let out = std::cell::RefCell::new(vec![0.0f32; x.len()]);
    println!(
        "768/32 depthwise k7 + epilogue    {:.3} ms",
        ms(|| forward_into(&geo, &x, &dw, &zeros, Some(&epi), &mut out.borrow_mut()))
    );
    println!(
        "768/32 depthwise k7, no epilogue  {:.3} ms",
        ms(|| forward_into(&geo, &x, &dw, &zeros, None, &mut out.borrow_mut()))
    );
    let pw = HostLinear {
        wt: v(c * c),
        b: zeros.clone(),
        ..Default::default()
    };
    println!(
        "768/32 pointwise + epilogue       {:.3} ms",
        ms(|| pointwise_into(&x, &pw, &epi, false, &mut out.borrow_mut()))
    );
    let t = std::cell::RefCell::new(Vec::new());
    println!(
        "768/32 pointwise weight transpose {:.3} ms",
        ms(|| spin_core::kernels::gemm::transpose_into(&mut t.borrow_mut(), &pw.wt, c, c))
    );
    vit_linear_backward();
}

/// DeiT-Tiny's fc1 backward at batch 8 (1576 rows, 192 → 768): gemm against the packed kernel,
/// for the input and the weight gradient.
fn vit_linear_backward() {
    use spin_core::kernels::gemm::{par_matmul, par_matmul_tn, MatRef};
    use spin_core::kernels::packed;
    let (rows, inp, out) = (1576, 192, 768);
    let v = values;
    let (gy, w, x) = (v(rows * out), v(out * inp), v(rows * inp));
    let gx = std::cell::RefCell::new(vec![0.0f32; rows * inp]);
    let gw = std::cell::RefCell::new(vec![0.0f32; out * inp]);
    println!(
        "fc1 dx gemm   {:.3} ms",
        ms(|| par_matmul(&gy, MatRef::row_major(&w, out, inp), &mut gx.borrow_mut()))
    );
    println!(
        "fc1 dx packed {:.3} ms",
        ms(|| packed::linear_grad_input(&gy, &w, (out, inp), &mut gx.borrow_mut(), true))
    );
    println!(
        "fc1 dW gemm   {:.3} ms",
        ms(|| drop(par_matmul_tn(&gy, out, &x, inp)))
    );
    println!(
        "fc1 dW packed {:.3} ms",
        ms(|| packed::linear_grad_weight(&gy, &x, (out, inp), &mut gw.borrow_mut(), None))
    );
}

/// DeiT-Tiny's attention core at batch 1 (197 tokens, 3 heads of 64) on one thread: the fused
/// AVX-512 tiles with their key packing (skipped where the CPU lacks AVX-512F).
fn vit_attention() {
    use spin_core::kernels::attention_tile::{applies, attention_core_f32};
    let (n, heads, d) = (197, 3, 192);
    if !applies(d / heads) {
        return;
    }
    let qkv = values(n * 3 * d);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let t = pool.install(|| {
        let out = std::cell::RefCell::new(vec![0.0f32; n * d]);
        ms(|| attention_core_f32(&qkv, &mut out.borrow_mut(), 1, heads, d))
    });
    println!("DeiT-Tiny b1 attention, 1 thread  {:.1} µs", t * 1000.0);
}

/// One thread's share of a ViT linear layer at inference, `(rows, in) → out`, with the weight
/// packed for the AVX-512 kernel and kept for inference (split for AMX tiles where available):
/// DeiT-Tiny b1's qkv (99 of 197 rows) and DeiT-Small b8's qkv and fc2 (128-row tasks).
fn packed_products() {
    use spin_core::kernels::packed::{amx, linear_packed, PackedRhs};
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    for (rows, k, n) in [(99, 192, 576), (128, 384, 1152), (128, 1536, 384)] {
        let (x, wt, bias) = (values(rows * k), values(k * n), values(n));
        let mut line = format!("linear {rows}×{k}→{n}, 1 thread:");
        let kinds = [
            ("AVX-512", PackedRhs::pack(&wt, k, n)),
            ("AMX", PackedRhs::pack_kept(&wt, k, n)),
        ];
        for (name, w) in kinds.iter().take(if amx::available() { 2 } else { 1 }) {
            let t = pool.install(|| {
                let out = std::cell::RefCell::new(vec![0.0f32; rows * n]);
                ms(|| linear_packed(&mut out.borrow_mut(), &x, w, &bias, false))
            });
            line += &format!("  {name} {:.0} GFLOP/s", 2.0 * (rows * k * n) as f64 / t / 1e6);
        }
        println!("{line}");
    }
}
