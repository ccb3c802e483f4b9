//! The optimiser.
//!
//! AdamW is spin's own rather than dfdx's `Adam`, whose moments are private: resuming a run needs
//! them saved and restored exactly.
use crate::checkpoint::TensorMap;
use crate::device::values_mut;
use crate::error::Error;
use crate::kernels::elementwise::CHUNK;
use dfdx::nn::tensor_collection::{RecursiveWalker, TensorVisitor, ViewTensorMut, ViewTensorRef};
use dfdx::prelude::*;
use multiversion::multiversion;
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// AdamW (decoupled weight decay, as PyTorch's `AdamW`), with optional clipping of the global
/// gradient L2 norm. Weight decay skips 1-D tensors (biases and norm scales), as timm does.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    /// The moments' decay rates.
    pub betas: (f32, f32),
    /// Added to the second moment's root.
    pub eps: f32,
    /// Decoupled weight decay (skipped for 1-D tensors).
    pub weight_decay: f32,
    /// Steps taken so far.
    pub t: u64,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl AdamW {
    /// PyTorch's defaults (betas 0.9, 0.999; eps 1e-8) with this weight decay.
    pub fn new(weight_decay: f32) -> Self {
        Self {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay,
            t: 0,
            m: vec![],
            v: vec![],
        }
    }

    /// One update of every trainable tensor of `model` from `grads`; returns the gradient norm
    /// before clipping. The gradients are read in place (`grads` is mutable only for that: dfdx's
    /// `Gradients::get` copies each one) and keep their values; a trainable tensor that had no
    /// gradient gets a zero-filled one, as `get` would have returned.
    pub fn step<M: TensorCollection<f32, Cpu>>(
        &mut self,
        model: &mut M,
        grads: &mut Gradients<f32, Cpu>,
        lr: f32,
        clip: Option<f32>,
    ) -> f32 {
        self.update(model, grads, lr, clip, false)
    }

    /// [`AdamW::step`], then `grads` left as dfdx's `zero_grads` leaves them for the next step:
    /// each trainable tensor's gradient zeroed, in the update's own pass over it (dfdx fills
    /// them one after another on one thread), and for gradients made by the model's
    /// `alloc_grads` (which marks its tensors as the ones to keep) any other gradient dropped.
    pub fn step_and_zero_grads<M: TensorCollection<f32, Cpu>>(
        &mut self,
        model: &mut M,
        grads: &mut Gradients<f32, Cpu>,
        lr: f32,
        clip: Option<f32>,
    ) -> f32 {
        let norm = self.update(model, grads, lr, clip, true);
        grads.drop_non_leafs();
        norm
    }

    fn update<M: TensorCollection<f32, Cpu>>(
        &mut self,
        model: &mut M,
        grads: &mut Gradients<f32, Cpu>,
        lr: f32,
        clip: Option<f32>,
        zero_grads: bool,
    ) -> f32 {
        let mut squares = SquaredNorms {
            grads: &mut *grads,
            sizes: vec![],
            sums: vec![],
        };
        let _ = M::iter_tensors(&mut RecursiveWalker {
            m: &*model,
            f: &mut squares,
        });
        let (sizes, sums) = (squares.sizes, squares.sums);
        // Partial sums added in a fixed order: the norm does not depend on the threads.
        let norm = sums.iter().sum::<f64>().sqrt() as f32;
        let scale = match clip {
            Some(c) if norm > c => c / (norm + 1e-6),
            _ => 1.0,
        };
        if self.m.len() != sizes.len() {
            self.m = sizes.iter().map(|&n| vec![0.0; n]).collect();
            self.v = self.m.clone();
        }
        self.t += 1;
        let mut update = Update {
            opt: self,
            grads,
            lr,
            scale,
            i: 0,
            zero_grads,
        };
        let _ = M::iter_tensors(&mut RecursiveWalker {
            m: model,
            f: &mut update,
        });
        norm
    }

    /// The optimiser's state as tensors (`adamw.m.NNNN`, `adamw.v.NNNN`) and metadata
    /// (`adamw.t`, `adamw.weight_decay`), for a run's resumable state.
    pub fn to_tensors(&self) -> (TensorMap, BTreeMap<String, String>) {
        let mut tensors = TensorMap::new();
        for (which, moments) in [("m", &self.m), ("v", &self.v)] {
            for (i, m) in moments.iter().enumerate() {
                let values = m.iter().map(|&x| x as f64).collect();
                tensors.insert(format!("adamw.{which}.{i:04}"), (vec![m.len()], values));
            }
        }
        let meta = BTreeMap::from([
            ("adamw.t".to_string(), self.t.to_string()),
            ("adamw.weight_decay".to_string(), self.weight_decay.to_string()),
        ]);
        (tensors, meta)
    }

    /// Restores what [`AdamW::to_tensors`] gave; other tensors are ignored. `source` names the
    /// file in errors.
    pub fn from_tensors(
        source: &Path,
        tensors: &TensorMap,
        meta: &HashMap<String, String>,
    ) -> Result<Self, Error> {
        let bad = |reason: String| Error::Safetensors {
            path: source.into(),
            reason,
        };
        let get = |k: &str| meta.get(k).ok_or_else(|| bad(format!("missing metadata `{k}`")));
        let mut opt = AdamW::new(
            get("adamw.weight_decay")?
                .parse()
                .map_err(|_| bad("bad `adamw.weight_decay`".into()))?,
        );
        opt.t = get("adamw.t")?.parse().map_err(|_| bad("bad `adamw.t`".into()))?;
        // BTreeMap order: adamw.m.0000, adamw.m.0001, …, then adamw.v.….
        for (k, (_, v)) in tensors {
            let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
            match k.strip_prefix("adamw.").and_then(|k| k.split_once('.')) {
                Some(("m", _)) => opt.m.push(v),
                Some(("v", _)) => opt.v.push(v),
                _ => {}
            }
        }
        if opt.m.len() != opt.v.len() {
            return Err(bad(
                "the optimiser's first and second moments differ in count".into()
            ));
        }
        Ok(opt)
    }
}

/// The gradient of a trainable tensor, read in place: its values in the tensor's order (the
/// model's tensors are contiguous).
fn grad_of<'g, S: Shape>(
    grads: &'g mut Gradients<f32, Cpu>,
    t: &Tensor<S, f32, Cpu>,
) -> Result<&'g [f32], dfdx::tensor::CpuError> {
    let g: &[f32] = grads.get_or_alloc_mut(t)?;
    assert_eq!(g.len(), t.shape().num_elements(), "AdamW: a strided parameter");
    Ok(g)
}

/// The size and the squared L2 norm (in f64, per chunk in parallel, the chunks' sums added in
/// order) of every trainable tensor's gradient, in visiting order.
struct SquaredNorms<'a> {
    grads: &'a mut Gradients<f32, Cpu>,
    sizes: Vec<usize>,
    sums: Vec<f64>,
}

impl TensorVisitor<f32, Cpu> for SquaredNorms<'_> {
    type Viewer = ViewTensorRef;
    type Err = dfdx::tensor::CpuError;
    type E2 = f32;
    type D2 = Cpu;
    fn visit<S: Shape>(
        &mut self,
        opts: TensorOptions<S, f32, Cpu>,
        t: &Tensor<S, f32, Cpu>,
    ) -> Result<Option<Tensor<S, f32, Cpu>>, Self::Err> {
        if opts.do_gradient_update {
            let g = grad_of(self.grads, t)?;
            let partial: Vec<f64> = g
                .par_chunks(CHUNK)
                .map(|c| c.iter().map(|&x| x as f64 * x as f64).sum())
                .collect();
            self.sizes.push(g.len());
            self.sums.push(partial.iter().sum());
        }
        Ok(None)
    }
}

struct Update<'a> {
    opt: &'a mut AdamW,
    grads: &'a mut Gradients<f32, Cpu>,
    lr: f32,
    scale: f32,
    i: usize,
    /// Whether each gradient is zeroed once read.
    zero_grads: bool,
}

impl TensorVisitor<f32, Cpu> for Update<'_> {
    type Viewer = ViewTensorMut;
    type Err = dfdx::tensor::CpuError;
    type E2 = f32;
    type D2 = Cpu;
    fn visit<S: Shape>(
        &mut self,
        opts: TensorOptions<S, f32, Cpu>,
        t: &mut Tensor<S, f32, Cpu>,
    ) -> Result<Option<Tensor<S, f32, Cpu>>, Self::Err> {
        if !opts.do_gradient_update {
            return Ok(None);
        }
        let i = self.i;
        self.i += 1;
        let o = &mut *self.opt;
        let (b1, b2) = o.betas;
        let bc1 = 1.0 - b1.powi(o.t as i32);
        let bc2 = 1.0 - b2.powi(o.t as i32);
        let decay = if S::NUM_DIMS > 1 {
            1.0 - self.lr * o.weight_decay
        } else {
            1.0
        };
        let (m, v) = (&mut o.m[i], &mut o.v[i]);
        let step = AdamStep {
            betas: (b1, b2),
            corrections: (bc1, bc2),
            eps: o.eps,
            lr: self.lr,
            decay,
            scale: self.scale,
        };
        let g: &mut [f32] = self.grads.get_or_alloc_mut(t)?;
        // The values are updated in place across threads: dfdx's `copy_from` of a new slice was
        // a serial copy of every parameter.
        let p = values_mut(t);
        let n = p.len();
        assert!(
            m.len() == n && v.len() == n && g.len() == n,
            "AdamW: tensor {i} has {n} values but its moments or gradient another count"
        );
        let zero = self.zero_grads;
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK).zip(g.par_chunks_mut(CHUNK)))
            .for_each(|((p, m), (v, g))| {
                adamw_chunk(p, m, v, g, &step);
                if zero {
                    g.fill(0.0);
                }
            });
        Ok(None)
    }
}

/// One AdamW step's constants.
struct AdamStep {
    betas: (f32, f32),
    corrections: (f32, f32),
    eps: f32,
    lr: f32,
    decay: f32,
    scale: f32,
}

/// The AdamW update of one chunk of a tensor's values `p` (in place), its moments and its
/// gradient: a plain loop compiled for AVX-512 and AVX2 too (the same operations in the same
/// order as a scalar loop, so results do not depend on the CPU).
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn adamw_chunk(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], s: &AdamStep) {
    let ((b1, b2), (bc1, bc2)) = (s.betas, s.corrections);
    for (((pk, mk), vk), &gk) in p.iter_mut().zip(m).zip(v).zip(g) {
        let g = gk * s.scale;
        *mk = b1 * *mk + (1.0 - b1) * g;
        *vk = b2 * *vk + (1.0 - b2) * g * g;
        let step = (*mk / bc1) / ((*vk / bc2).sqrt() + s.eps);
        *pk = *pk * s.decay - s.lr * step;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::host;

    #[test]
    fn two_adamw_steps_follow_the_formula() {
        // A Linear of 200 × 100 weights (more than one chunk of the parallel update) and 100
        // biases; the f64 formula with decay on the weight only, bias-corrected moments.
        let dev = Cpu::seed_from_u64(3);
        let mut lin = dev.build_module::<dfdx::nn::builders::Linear<200, 100>, f32>();
        let x: Tensor<Rank2<4, 200>, f32, Cpu> = dev.sample_normal();
        let y = lin.forward(x.trace(lin.alloc_grads()));
        let mut grads = y.square().sum().backward();
        let start = [host(&lin.weight), host(&lin.bias)];
        let g = [host(&grads.get(&lin.weight)), host(&grads.get(&lin.bias))];
        let (lr, wd) = (0.01, 0.05);
        let mut opt = AdamW::new(wd);
        opt.step(&mut lin, &mut grads, lr, None);
        opt.step(&mut lin, &mut grads, lr, None);
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
        for (i, got) in [host(&lin.weight), host(&lin.bias)].iter().enumerate() {
            let decay = if i == 0 { 1.0 - lr as f64 * wd as f64 } else { 1.0 };
            for k in 0..got.len() {
                let (mut p, mut m, mut v) = (start[i][k] as f64, 0.0, 0.0);
                let gk = g[i][k] as f64;
                for t in 1..=2 {
                    m = b1 * m + (1.0 - b1) * gk;
                    v = b2 * v + (1.0 - b2) * gk * gk;
                    let step = (m / (1.0 - b1.powi(t))) / ((v / (1.0 - b2.powi(t))).sqrt() + eps);
                    p = p * decay - lr as f64 * step;
                }
                assert!(
                    (got[k] as f64 - p).abs() < 1e-6,
                    "tensor {i}[{k}]: {} vs {p}",
                    got[k]
                );
            }
        }
    }

    /// `step_and_zero_grads` updates as `step` does and leaves the gradients as dfdx's
    /// `zero_grads` does: the parameters' zeroed, the rest dropped.
    #[test]
    fn step_and_zero_grads_is_step_then_zero_grads() {
        let dev = Cpu::seed_from_u64(4);
        let lin = dev.build_module::<dfdx::nn::builders::Linear<200, 100>, f32>();
        let x: Tensor<Rank2<4, 200>, f32, Cpu> = dev.sample_normal();
        let run = |fused: bool| {
            let mut lin = lin.clone();
            let y = lin.forward(x.clone().trace(lin.alloc_grads()));
            let mut grads = y.square().sum().backward();
            let mut opt = AdamW::new(0.05);
            if fused {
                opt.step_and_zero_grads(&mut lin, &mut grads, 0.01, Some(1.0));
            } else {
                opt.step(&mut lin, &mut grads, 0.01, Some(1.0));
                lin.zero_grads(&mut grads);
            }
            let g = [host(&grads.get(&lin.weight)), host(&grads.get(&lin.bias))];
            ([host(&lin.weight), host(&lin.bias)], g)
        };
        let (want, _) = run(false);
        let (got, g) = run(true);
        assert_eq!(got, want);
        assert!(g.iter().flatten().all(|&v| v == 0.0), "a gradient is not zeroed");
    }
}
