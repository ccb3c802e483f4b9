//! `spin bench`: wall-clock timing of a forward pass (or a full training step) after warm-up,
//! with peak resident memory. Numbers go to the README; no test asserts a duration.
use crate::build;
use serde::Serialize;
use spin_core::device::profile::{self, OpTime, Pass};
use spin_core::dfdx::prelude::*;
use spin_core::train::{AdamW, StepParams};
use spin_core::Error;
use std::time::Instant;

/// One measurement, as `--json` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    pub model: String,
    pub batch: usize,
    pub mode: String,
    pub dtype: String,
    pub threads: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub images_per_s: f64,
    pub peak_rss_mb: f64,
    /// The kernel spin's packed matrix products take in this mode: `amx` (tiles, f32 accuracy),
    /// `avx512` (spin's packed kernel) or `gemm`. Layers without a packed path (FiPS's sparse
    /// factors, say) keep their own products whatever this says.
    pub matmul: String,
    /// With `--profile`: where a training step's time goes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<StepProfile>,
}

/// Per-step wall time by op, as `--profile` reports it (averaged over the timed steps).
#[derive(Clone, Debug, Serialize)]
pub struct StepProfile {
    /// One row per op, in the order first called; then the rest of each pass (dfdx's own ops,
    /// the loss) and the whole pass.
    pub rows: Vec<ProfileRow>,
    /// AdamW's step (gradient norm, clipping, update) and zeroing the gradients.
    pub optimizer_ms: f64,
}

/// One op's (or a remainder's) share of a step.
#[derive(Clone, Debug, Serialize)]
pub struct ProfileRow {
    /// The op, or `rest (…)` and `whole pass`.
    pub op: String,
    /// Milliseconds per step in the forward pass.
    pub forward_ms: f64,
    /// Milliseconds per step in the backward pass.
    pub backward_ms: f64,
    /// Calls per step (of the forward, or of the backward for ops timed only there).
    pub calls: f64,
}

/// "1 thread", "2 threads".
pub fn threads_text(n: usize) -> String {
    format!("{n} thread{}", if n == 1 { "" } else { "s" })
}

/// `--profile`'s table: ms per step by op, forward and backward.
pub fn write_profile(out: &mut dyn std::io::Write, p: &StepProfile, steps: usize) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<34} {:>10} {:>11} {:>6}",
        format!("ms per step ({steps} steps)"),
        "forward",
        "backward",
        "calls"
    )?;
    for r in &p.rows {
        let calls = if r.calls > 0.0 {
            format!("{:.0}", r.calls)
        } else {
            String::new()
        };
        let line = format!(
            "  {:<32} {:>10.2} {:>11.2} {:>6}",
            r.op, r.forward_ms, r.backward_ms, calls
        );
        writeln!(out, "{}", line.trim_end())?;
    }
    writeln!(
        out,
        "  {:<32} {:>10.2}",
        "optimizer (AdamW, zeroing)", p.optimizer_ms
    )
}

/// Per-step rows from the recorded sums of `steps` steps.
fn step_profile(times: &[OpTime], steps: usize) -> StepProfile {
    let per_step = |ms: f64| ms / steps.max(1) as f64;
    let sum = |op: &str, pass: Pass| -> (f64, u64) {
        times
            .iter()
            .filter(|t| t.op == op && t.pass == pass)
            .fold((0.0, 0), |(ms, calls), t| (ms + t.ms, calls + t.calls))
    };
    let mut rows: Vec<ProfileRow> = Vec::new();
    for t in times.iter().filter(|t| t.pass != Pass::Phase) {
        if rows.iter().any(|r| r.op == t.op) {
            continue;
        }
        let ((fwd, fwd_calls), (bwd, bwd_calls)) = (sum(t.op, Pass::Forward), sum(t.op, Pass::Backward));
        rows.push(ProfileRow {
            op: t.op.to_string(),
            forward_ms: per_step(fwd),
            backward_ms: per_step(bwd),
            calls: per_step(fwd_calls.max(bwd_calls) as f64),
        });
    }
    let (ops_fwd, ops_bwd) = rows
        .iter()
        .fold((0.0, 0.0), |(f, b), r| (f + r.forward_ms, b + r.backward_ms));
    let (pass_fwd, pass_bwd) = (
        per_step(sum("forward and loss", Pass::Phase).0),
        per_step(sum("backward", Pass::Phase).0),
    );
    rows.push(ProfileRow {
        op: "rest (dfdx's own ops, the loss)".into(),
        forward_ms: pass_fwd - ops_fwd,
        backward_ms: pass_bwd - ops_bwd,
        calls: 0.0,
    });
    rows.push(ProfileRow {
        op: "whole pass".into(),
        forward_ms: pass_fwd,
        backward_ms: pass_bwd,
        calls: 0.0,
    });
    StepProfile {
        rows,
        optimizer_ms: per_step(sum("optimizer", Pass::Phase).0),
    }
}

/// The kernel behind a run's matrix products: kept inference weights go to AMX tiles where
/// available, training products to the AVX-512 kernel, f16 and CPUs without AVX-512 to gemm.
fn matmul_kernel(train: bool, dtype: &str) -> &'static str {
    use spin_core::kernels::packed;
    #[cfg(target_arch = "x86_64")]
    if !train && dtype == "f32" && packed::amx::available() {
        return "amx";
    }
    if dtype == "f32" && packed::available() {
        "avx512"
    } else {
        "gemm"
    }
}

/// Peak resident set size of this process (Linux `VmHWM`), in MB; 0 where unavailable.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Untimed runs before the timed ones (first-touch allocations, kept weights, caches).
const WARMUP: usize = 2;

fn time(iters: usize, warmup: usize, mut f: impl FnMut() -> Result<(), Error>) -> Result<(f64, f64), Error> {
    for _ in 0..warmup {
        f()?;
    }
    let mut ms = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        f()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    Ok((ms[ms.len() / 2], ms[0]))
}

/// Times `model` in f32 on the CPU.
pub fn bench(
    name: &str,
    weights: Option<&std::path::Path>,
    batch: usize,
    train: bool,
    iters: usize,
    profile_ops: bool,
) -> Result<BenchResult, Error> {
    let mut model = match weights {
        Some(w) => crate::load(name, w)?,
        None => build(name, 0)?,
    };
    let info = model.info();
    let dev = Cpu::seed_from_u64(1);
    let n = batch * 3 * info.image * info.image;
    let x: Tensor<(usize,), f32, Cpu> = dev.sample_normal_like(&(n,));
    let x = x.as_vec();
    let labels: Vec<usize> = (0..batch).map(|i| i % info.classes).collect();
    let mut opt = AdamW::new(0.05);
    let hp = StepParams {
        lr: 1e-4,
        label_smoothing: 0.1,
        clip: Some(1.0),
    };
    let (median, min) = if train {
        // With --profile, recording starts at the first timed step (after the warm-ups).
        let mut steps = 0;
        let timing = time(iters, WARMUP, || {
            steps += 1;
            if profile_ops && steps == WARMUP + 1 {
                profile::take();
                profile::enable(true);
            }
            model.train_step(&x, &labels, None, &mut opt, &hp).map(|_| ())
        });
        profile::enable(false);
        timing?
    } else {
        time(iters, WARMUP, || {
            std::hint::black_box(model.predict(&x, batch));
            Ok(())
        })?
    };
    let mut r = result(name, batch, train, "f32", median, min);
    if profile_ops {
        r.profile = Some(step_profile(&profile::take(), iters.max(1)));
    }
    Ok(r)
}

fn result(name: &str, batch: usize, train: bool, dtype: &str, median: f64, min: f64) -> BenchResult {
    BenchResult {
        model: name.to_string(),
        batch,
        mode: if train { "train" } else { "forward" }.into(),
        dtype: dtype.into(),
        threads: rayon::current_num_threads(),
        median_ms: median,
        min_ms: min,
        images_per_s: batch as f64 / (median / 1e3),
        peak_rss_mb: peak_rss_mb(),
        matmul: matmul_kernel(train, dtype).into(),
        profile: None,
    }
}

/// Times an f16 forward pass. dfdx has an f16 CPU device but the registry builds f32 models, so
/// the members with an f16 path are listed here.
pub fn bench_f16(name: &str, batch: usize, iters: usize) -> Result<BenchResult, Error> {
    use spin_core::dfdx::dtypes::f16;
    use spin_core::models::SpinModel;
    fn run<X>(batch: usize, iters: usize) -> Result<(f64, f64), Error>
    where
        X: BuildOnDevice<Cpu, f16> + spin_core::Describe,
        X::Built: SpinModel<f16, Cpu>,
    {
        let info = X::info();
        let dev = Cpu::seed_from_u64(0);
        let m = dev.build_module::<X, f16>();
        let x: Tensor<(usize, usize, usize, usize), f32, Cpu> =
            dev.sample_normal_like(&(batch, 3, info.image, info.image));
        let x = x.to_dtype::<f16>();
        time(iters, WARMUP, || {
            std::hint::black_box(m.logits(x.clone()));
            Ok(())
        })
    }
    let (median, min) = match name {
        "convmixer_256_8_ks9_p2" => run::<crate::convmixer_256_8_ks9_p2>(batch, iters)?,
        "deit_tiny_patch16_224" => run::<crate::deit_tiny_patch16_224>(batch, iters)?,
        "digits_convmixer_64_8" => run::<crate::digits_convmixer_64_8>(batch, iters)?,
        _ => {
            return Err(Error::Invalid(format!(
                "no f16 path for `{name}`: f16 benchmarks cover convmixer_256_8_ks9_p2, deit_tiny_patch16_224 and digits_convmixer_64_8"
            )))
        }
    };
    Ok(result(name, batch, false, "f16", median, min))
}
