use super::*;
use crate::device::SpinDevice;

/// The sizes of a test trunk: `batch` images of `n` tokens, `d` features, `heads` heads,
/// `hidden` MLP features.
struct Sizes {
    batch: usize,
    n: usize,
    d: usize,
    heads: usize,
    hidden: usize,
}

/// One block's twelve parameters as plain tensors: the four Linear weights, and the eight vectors
/// (the norms' scales and shifts and the biases) in [`VitBlockParams`]'s order.
struct Leaves<E: Dtype> {
    vectors: Vec<Tensor<(usize,), E, Cpu>>,
    mats: Vec<Tensor<Mat, E, Cpu>>,
}

impl<E: SpinDtype> Leaves<E> {
    fn new(z: &Sizes, seed: usize) -> Self {
        let dev = Cpu::default();
        let (d, hd) = (z.d, z.hidden);
        let sample = |len: usize, s: usize, scale: f64, shift: f64| -> Vec<E> {
            let v = crate::kernels::test_values(len, seed * 100 + s);
            v.into_iter()
                .map(|v: f32| E::cast(scale * v as f64 + shift))
                .collect()
        };
        let mat = |(r, c): Mat, s| dev.tensor_from_vec(sample(r * c, s, 1.0, 0.0), (r, c));
        let vector = |n: usize, s, shift| dev.tensor_from_vec(sample(n, s, 0.5, shift), (n,));
        Leaves {
            mats: vec![
                mat((3 * d, d), 1),
                mat((d, d), 2),
                mat((hd, d), 3),
                mat((d, hd), 4),
            ],
            vectors: vec![
                vector(d, 5, 1.0),
                vector(d, 6, 0.0),
                vector(3 * d, 7, 0.0),
                vector(d, 8, 0.0),
                vector(d, 9, 1.0),
                vector(d, 10, 0.0),
                vector(hd, 11, 0.0),
                vector(d, 12, 0.0),
            ],
        }
    }

    /// The parameters, each on a tape of its own.
    fn taped(&self) -> VitBlockParams<E, Cpu, OwnedTape<E, Cpu>> {
        let m = |i: usize| self.mats[i].clone().put_tape(OwnedTape::default());
        let v = |i: usize| self.vectors[i].clone().put_tape(OwnedTape::default());
        VitBlockParams {
            norm1: (v(0), v(1)),
            qkv: (m(0), v(2)),
            proj: (m(1), v(3)),
            norm2: (v(4), v(5)),
            fc1: (m(2), v(6)),
            fc2: (m(3), v(7)),
        }
    }

    /// Their gradients in `g`, as f64, in [`VitBlockParams`]'s order.
    fn grads(&self, g: &Gradients<E, Cpu>) -> Vec<Vec<f64>> {
        let (m, v) = (&self.mats, &self.vectors);
        let order: [&dyn Fn() -> Vec<E>; 12] = [
            &|| g.get(&v[0]).as_vec(),
            &|| g.get(&v[1]).as_vec(),
            &|| g.get(&m[0]).as_vec(),
            &|| g.get(&v[2]).as_vec(),
            &|| g.get(&m[1]).as_vec(),
            &|| g.get(&v[3]).as_vec(),
            &|| g.get(&v[4]).as_vec(),
            &|| g.get(&v[5]).as_vec(),
            &|| g.get(&m[2]).as_vec(),
            &|| g.get(&v[6]).as_vec(),
            &|| g.get(&m[3]).as_vec(),
            &|| g.get(&v[7]).as_vec(),
        ];
        order.iter().map(|f| f64s(f())).collect()
    }
}

fn f64s<E: SpinDtype>(v: Vec<E>) -> Vec<f64> {
    v.into_iter().map(|v| v.to_f64().unwrap()).collect()
}

/// The output, x's gradient and both parameter sets' gradients of `Σ r ⊙ y` in dtype `E`, as
/// f64, by [`Cpu::vit_blocks`] (`ours`) or [`vit_blocks_composed`], for three blocks of which
/// the first and last share their parameters (so each of their gradients must be added onto
/// one already there), with x also entering the loss by itself.
fn run<E: SpinDtype>(ours: bool, z: &Sizes) -> Vec<Vec<f64>>
where
    Cpu: SpinDevice<E>,
{
    let dev = Cpu::default();
    let rows = z.batch * z.n;
    let sample = |seed| -> Tensor<Mat, E, Cpu> {
        let v = crate::kernels::test_values::<E>(rows * z.d, seed);
        dev.tensor_from_vec(v, (rows, z.d))
    };
    let (x, r) = (sample(1), sample(2));
    let (shared, own) = (Leaves::<E>::new(z, 1), Leaves::<E>::new(z, 2));
    let xt = x.clone().traced(Gradients::leaky());
    let direct = xt.with_empty_tape();
    let blocks = vec![shared.taped(), own.taped(), shared.taped()];
    let y = if ours {
        Cpu::vit_blocks(xt, blocks, z.batch, z.heads)
    } else {
        vit_blocks_composed(xt, blocks, z.batch, z.heads)
    };
    let out = f64s(y.retaped::<NoneTape>().as_vec());
    let g = ((y * r.clone()).sum::<(), _>() + (direct * r).sum::<(), _>()).backward();
    let mut got = vec![out, f64s(g.get(&x).as_vec())];
    got.extend(shared.grads(&g));
    got.extend(own.grads(&g));
    got
}

/// The op against the composed ops in f64: the output and the gradients of x and of both
/// parameter sets, within 1e-12 of the largest magnitude in f64 and 2e-4 in f32 (the one-op path
/// where the CPU has AVX-512; its reused buffers are NaN under test, so a kernel leaving any
/// value unwritten fails); with 32 features (the weight gradients read the inputs in place) and
/// 24 (packed).
#[test]
fn vit_blocks_match_the_composed_ops() {
    let part = [
        "norm1.w", "norm1.b", "qkv.w", "qkv.b", "proj.w", "proj.b", "norm2.w", "norm2.b", "fc1.w", "fc1.b",
        "fc2.w", "fc2.b",
    ];
    let names: Vec<String> = ["y".to_string(), "dx".to_string()]
        .into_iter()
        .chain(part.iter().map(|p| format!("shared d{p}")))
        .chain(part.iter().map(|p| format!("own d{p}")))
        .collect();
    for z in [
        Sizes {
            batch: 3,
            n: 7,
            d: 32,
            heads: 2,
            hidden: 64,
        },
        Sizes {
            batch: 2,
            n: 5,
            d: 24,
            heads: 3,
            hidden: 40,
        },
    ] {
        let want = run::<f64>(false, &z);
        for (tol, got) in [(1e-12, run::<f64>(true, &z)), (2e-4, run::<f32>(true, &z))] {
            assert_eq!(got.len(), names.len());
            for ((got, want), name) in got.iter().zip(&want).zip(&names) {
                let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                assert!(
                    scale > 1e-3 && got.len() == want.len(),
                    "{name}: trivial or wrong length"
                );
                for (i, (a, b)) in got.iter().zip(want).enumerate() {
                    let close = (a - b).abs() < tol * scale.max(1.0);
                    assert!(close, "d = {}: {name}[{i}]: {a} vs {b}", z.d);
                }
            }
        }
    }
}
