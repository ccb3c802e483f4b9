//! Times spin's CPU kernels on ConvMixer-256/8's shapes (batch 8, 16×16, 256 channels, k9):
//! `cargo run --release -p spin-core --example kernel_timing`.
use spin_core::device::{DepthwiseKernel, GeluKernel, NormKernels};
use spin_core::dfdx::prelude::*;
use std::time::Instant;

fn ms(f: impl Fn()) -> f64 {
    f();
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
}
