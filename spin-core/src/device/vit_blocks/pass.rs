//! One block's forward and backward on the host, f32 with AVX-512: the kernels of the seven ops,
//! each part timed under that op's name in [`crate::device::profile`]. Buffers a kernel
//! overwrites whole come from [`overwritable`] and go back after the backward.
use super::{Vector, VitBlockParams};
use crate::base::{Mat, SpinDtype, LN_EPS};
use crate::device::linear::add_weight_grads;
use crate::device::profile::{timed, Pass};
use crate::device::{transpose, values, Values};
use crate::kernels::attention::{attention_core_backward, attention_core_keep};
use crate::kernels::blocks::{linear_rows, HostLinear};
use crate::kernels::elementwise::{add_into, copied, gelu, gelu_grad_in_place, zeros};
use crate::kernels::norm::{layer_norm_bwd, layer_norm_fwd_into};
use crate::kernels::reuse::{give_back, overwritable};
use crate::kernels::{as_f32, as_f32_mut, packed};
use dfdx::prelude::*;
use dfdx::tensor::CpuError;

/// A block's parameter values, read in place; Linear weights `(out, in)`.
pub(super) struct Weights<E: SpinDtype> {
    g1: Values<(usize,), E>,
    b1: Values<(usize,), E>,
    qkv: Values<Mat, E>,
    qkv_b: Values<(usize,), E>,
    proj: Values<Mat, E>,
    proj_b: Values<(usize,), E>,
    g2: Values<(usize,), E>,
    b2: Values<(usize,), E>,
    fc1: Values<Mat, E>,
    fc1_b: Values<(usize,), E>,
    fc2: Values<Mat, E>,
    fc2_b: Values<(usize,), E>,
}

impl<E: SpinDtype> Weights<E> {
    /// `p`'s values, for `d` features; panics unless the shapes fit a block.
    pub(super) fn of(p: &VitBlockParams<E, Cpu, NoneTape>, d: usize) -> Self {
        let hidden = p.fc1.0.shape().0;
        let fits = [
            (*p.qkv.0.shape(), (3 * d, d)),
            (*p.proj.0.shape(), (d, d)),
            (*p.fc1.0.shape(), (hidden, d)),
            (*p.fc2.0.shape(), (d, hidden)),
        ];
        let biases = [
            (&p.qkv.1, 3 * d),
            (&p.proj.1, d),
            (&p.fc1.1, hidden),
            (&p.fc2.1, d),
        ];
        let norms = [&p.norm1.0, &p.norm1.1, &p.norm2.0, &p.norm2.1];
        assert!(
            fits.iter().all(|(a, b)| a == b)
                && biases.iter().all(|(b, n)| b.shape().0 == *n)
                && norms.iter().all(|g| g.shape().0 == d),
            "vit block: parameters do not fit {d} features"
        );
        Self {
            g1: values(&p.norm1.0),
            b1: values(&p.norm1.1),
            qkv: values(&p.qkv.0),
            qkv_b: values(&p.qkv.1),
            proj: values(&p.proj.0),
            proj_b: values(&p.proj.1),
            g2: values(&p.norm2.0),
            b2: values(&p.norm2.1),
            fc1: values(&p.fc1.0),
            fc1_b: values(&p.fc1.1),
            fc2: values(&p.fc2.0),
            fc2_b: values(&p.fc2.1),
        }
    }
}

/// A Linear's `(out, in)` weight and bias packed for this call's products.
fn packed_linear<E: SpinDtype>(w: &[E], b: &[E]) -> HostLinear<E> {
    let out = b.len();
    let mut l = HostLinear {
        wt: transpose(w, out, w.len() / out),
        b: b.to_vec(),
        ..Default::default()
    };
    l.pack_for_one_call();
    l
}

/// One block's forward pass and what its backward reads: both norms' outputs and row statistics,
/// qkv, the softmax, the attention's output, the first residual sum, fc1's output before and
/// after GELU, and the block's output (the next block's input).
pub(super) struct Block<E: SpinDtype> {
    w: Weights<E>,
    batch: usize,
    heads: usize,
    ln1: Vec<E>,
    stats1: Vec<f64>,
    qkv: Vec<E>,
    probs: Vec<E>,
    attn: Vec<E>,
    x1: Vec<E>,
    ln2: Vec<E>,
    stats2: Vec<f64>,
    h: Vec<E>,
    a: Vec<E>,
    /// The output.
    pub(super) y: Vec<E>,
}

impl<E: SpinDtype> Block<E> {
    /// The block on `x` `(batch·N, D)`.
    pub(super) fn forward(x: &[E], w: Weights<E>, batch: usize, heads: usize) -> Self {
        let d = w.g1.len();
        let (rows, hidden) = (x.len() / d, w.fc1_b.len());
        let n = rows / batch;
        let fwd = |op, f: &mut dyn FnMut()| timed(op, Pass::Forward, f);
        let mut b = Block {
            ln1: overwritable(rows * d),
            qkv: overwritable(rows * 3 * d),
            attn: overwritable(rows * d),
            probs: overwritable(batch * heads * n * n),
            ln2: overwritable(rows * d),
            h: overwritable(rows * hidden),
            a: overwritable(rows * hidden),
            stats1: Vec::new(),
            stats2: Vec::new(),
            x1: Vec::new(),
            y: Vec::new(),
            w,
            batch,
            heads,
        };
        let w = &b.w;
        fwd("layer norm", &mut || {
            b.stats1 = layer_norm_fwd_into(&mut b.ln1, x, &w.g1, &w.b1, LN_EPS)
        });
        fwd("linear", &mut || {
            linear_rows(&b.ln1, &packed_linear(&w.qkv, &w.qkv_b), &mut b.qkv, false)
        });
        fwd("attention core", &mut || {
            attention_core_keep(&b.qkv, &mut b.attn, &mut b.probs, (batch, heads, d))
        });
        fwd("linear+residual", &mut || {
            b.x1 = copied(x);
            linear_rows(&b.attn, &packed_linear(&w.proj, &w.proj_b), &mut b.x1, true);
        });
        fwd("layer norm", &mut || {
            b.stats2 = layer_norm_fwd_into(&mut b.ln2, &b.x1, &w.g2, &w.b2, LN_EPS)
        });
        fwd("linear+gelu", &mut || {
            linear_rows(&b.ln2, &packed_linear(&w.fc1, &w.fc1_b), &mut b.h, false);
            gelu(&mut b.a, &b.h);
        });
        fwd("linear+residual", &mut || {
            b.y = copied(&b.x1);
            linear_rows(&b.a, &packed_linear(&w.fc2, &w.fc2_b), &mut b.y, true);
        });
        b
    }

    /// The backward from `gy`, dL/d(output), for the block that ran on `x`: every parameter's
    /// gradient added onto its buffer in `grads`; returns dL/dx. `gy`'s buffer becomes x1's
    /// gradient and then x's.
    pub(super) fn backward(
        mut self,
        grads: &mut Gradients<E, Cpu>,
        p: &VitBlockParams<E, Cpu, NoneTape>,
        x: &[E],
        gy: Vec<E>,
    ) -> Result<Vec<E>, CpuError> {
        let d = self.w.g1.len();
        let w = &self.w;
        let bwd = |op, f: &mut dyn FnMut() -> Result<(), CpuError>| timed(op, Pass::Backward, f);
        // y = x1 + fc2(a): x1's gradient is gy plus what comes through LN2.
        let mut g = gy;
        let (mut ga, mut gln2, mut gattn, mut gqkv, mut gln1) = Default::default();
        bwd("linear+residual", &mut || {
            ga = linear_backward(grads, &p.fc2, &w.fc2, &self.a, &g)?;
            Ok(())
        })?;
        // a = GELU(h), h = fc1(ln2): h's buffer becomes its gradient.
        bwd("linear+gelu", &mut || {
            gelu_grad_in_place(&mut self.h, &ga);
            gln2 = linear_backward(grads, &p.fc1, &w.fc1, &self.ln2, &self.h)?;
            Ok(())
        })?;
        bwd("layer norm", &mut || {
            norm_backward(grads, &p.norm2, (&self.x1, &w.g2, &self.stats2), &gln2, &mut g)
        })?;
        // x1 = x + proj(attn): x's gradient is x1's plus what comes through LN1.
        bwd("linear+residual", &mut || {
            gattn = linear_backward(grads, &p.proj, &w.proj, &self.attn, &g)?;
            Ok(())
        })?;
        bwd("attention core", &mut || {
            gqkv = zeros(self.qkv.len());
            let dims = (self.batch, self.heads, d);
            attention_core_backward(&self.qkv, &self.probs, &gattn, &mut gqkv, dims);
            Ok(())
        })?;
        bwd("linear", &mut || {
            gln1 = linear_backward(grads, &p.qkv, &w.qkv, &self.ln1, &gqkv)?;
            Ok(())
        })?;
        bwd("layer norm", &mut || {
            norm_backward(grads, &p.norm1, (x, &w.g1, &self.stats1), &gln1, &mut g)
        })?;
        let s = self;
        for v in [
            ga, gln2, gattn, gln1, s.ln1, s.qkv, s.probs, s.attn, s.ln2, s.h, s.a,
        ] {
            give_back(v);
        }
        Ok(g)
    }
}

/// The input gradient dx = gy · W of a Linear (`(out, in)` weight `w`, input `x`, output
/// gradient `gy`) in a buffer of its own; dW and db added onto their buffers in `grads`.
fn linear_backward<E: SpinDtype>(
    grads: &mut Gradients<E, Cpu>,
    (w, b): &(Tensor<Mat, E, Cpu>, Vector<E, Cpu, NoneTape>),
    ws: &[E],
    x: &[E],
    gy: &[E],
) -> Result<Vec<E>, CpuError> {
    let mut gx = overwritable(x.len());
    packed::linear_grad_input(as_f32(gy), as_f32(ws), *w.shape(), as_f32_mut(&mut gx), false);
    add_weight_grads(grads, (w, b), x, gy)?;
    Ok(gx)
}

/// A norm's dx added onto `gx`, its dγ and dβ onto their buffers in `grads`.
fn norm_backward<E: SpinDtype>(
    grads: &mut Gradients<E, Cpu>,
    (g, b): &(Vector<E, Cpu, NoneTape>, Vector<E, Cpu, NoneTape>),
    (x, gs, stats): (&[E], &[E], &[f64]),
    gy: &[E],
    gx: &mut [E],
) -> Result<(), CpuError> {
    let (dg, db) = layer_norm_bwd(x, gs, stats, gy, gx);
    add_into(grads.get_or_alloc_mut(g)?, &dg);
    add_into(grads.get_or_alloc_mut(b)?, &db);
    Ok(())
}
