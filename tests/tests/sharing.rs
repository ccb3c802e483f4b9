//! The sharing engine: a shared tensor is stored once, its gradient is the sum over the layers that
//! use it, and shared models save and load as ordinary timm checkpoints with tied copies.
use spin_core::checkpoint::StorageDtype;
use spin_core::prelude::*;
use spin_core::Error;
use spin_tests::{fixture, scratch};

#[convmixer(dim = 8, kernel = 3, patch = 2, image = 8, classes = 5, act = gelu)]
#[shared_blocks(depth = 4, groups = 2, pattern = strided)]
struct SharedMixer;

#[convmixer(dim = 8, kernel = 3, patch = 2, image = 8, classes = 5, act = gelu, depth = 4)]
struct PlainMixer;

#[vit(dim = 8, heads = 2, patch = 4, image = 8, classes = 3)]
#[shared_blocks(depth = 4, groups = 2, pattern = cycle_rev, share = attn_mlp)]
struct SharedVit;

#[vit(dim = 8, heads = 2, patch = 4, image = 8, classes = 3, depth = 4)]
struct PlainVit;

// The fixture's architecture, shared: its four different pointwise convs cannot load into it.
#[convmixer(dim = 32, kernel = 5, patch = 2, image = 16, classes = 10, act = gelu)]
#[shared_blocks(depth = 4, groups = 2, pattern = sequential)]
struct SharedSmallMixer;

type Dev = Cpu;

fn input(dev: &Dev) -> Tensor<Rank4<3, 3, 8, 8>, f64, Dev> {
    dev.sample_normal()
}

/// Σ logits ⊙ r for a fixed r: a loss whose gradient reaches every parameter.
fn loss<S: Shape>(
    logits: Tensor<S, f64, Dev, OwnedTape<f64, Dev>>,
    r: &Tensor<S, f64, Dev>,
) -> Tensor<(), f64, Dev, OwnedTape<f64, Dev>> {
    (logits * r.clone()).sum()
}

#[test]
fn shared_parameters_are_stored_once() {
    let dev = Dev::default();
    let m = dev.build_module::<SharedMixer, f32>();
    assert_eq!(m.pw.len(), 2);
    assert_eq!(m.dw.len(), 4);
    assert_eq!(m.num_trainable_params(), SharedMixer::PARAMS);
    assert_eq!(
        dev.build_module::<PlainMixer, f32>().num_trainable_params(),
        PlainMixer::PARAMS
    );
    assert_eq!(PlainMixer::PARAMS - SharedMixer::PARAMS, 2 * (8 * 8 + 8));
    let v = dev.build_module::<SharedVit, f32>();
    assert_eq!(v.attn.len(), 2);
    assert_eq!(v.norm1.len(), 4);
    assert_eq!(v.num_trainable_params(), SharedVit::PARAMS);
    assert_eq!(SharedVit::SCHEDULE, [0, 1, 1, 0]);
}

#[test]
fn convmixer_shared_gradient_is_the_sum_over_tied_copies() {
    let dev = Dev::seed_from_u64(11);
    let mut shared = dev.build_module::<SharedMixer, f64>();
    let dir = scratch("tied-mixer");
    let path = dir.join("shared.safetensors");
    shared.save_timm_as(&path, StorageDtype::F64).unwrap();
    let mut plain = dev.build_module::<PlainMixer, f64>();
    plain.load_timm(&path).unwrap(); // tied copies become independent tensors

    let x = input(&dev);
    let r: Tensor<Rank2<3, 5>, f64, _> = dev.sample_normal();
    let gs = loss(shared.forward_mut(x.leaky_trace()), &r).backward();
    let gp = loss(plain.forward_mut(x.leaky_trace()), &r).backward();
    for g in 0..2 {
        let layers: Vec<usize> = (0..4).filter(|&i| SharedMixer::SCHEDULE[i] == g).collect();
        assert_eq!(layers.len(), 2);
        let want: Vec<f64> = (0..8 * 8)
            .map(|k| {
                layers
                    .iter()
                    .map(|&i| gp.get(&plain.pw[i].weight).as_vec()[k])
                    .sum()
            })
            .collect();
        let got = gs.get(&shared.pw[g].weight).as_vec();
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-10 * (1.0 + b.abs()), "group {g}: {a} vs {b}");
        }
    }
    // Unshared parts get their own gradient, equal in both models.
    let a = gs.get(&shared.dw[3].weight).as_vec();
    let b = gp.get(&plain.dw[3].weight).as_vec();
    assert!(a.iter().zip(&b).all(|(a, b)| (a - b).abs() < 1e-10));
}

#[test]
fn convmixer_shared_gradient_matches_finite_differences() {
    let dev = Dev::seed_from_u64(12);
    let mut m = dev.build_module::<SharedMixer, f64>();
    let x = input(&dev);
    let r: Tensor<Rank2<3, 5>, f64, _> = dev.sample_normal();
    let g = loss(m.forward_mut(x.leaky_trace()), &r).backward();
    let analytic = g.get(&m.pw[1].weight).as_vec();
    let base = m.pw[1].weight.as_vec();
    let eps = 1e-6;
    for k in [0, 9, 27, 63] {
        let mut f = |delta: f64| {
            let mut w = base.clone();
            w[k] += delta;
            m.pw[1].weight.copy_from(&w);
            let y = m.forward_mut(x.clone());
            (y * r.clone()).sum::<(), _>().array()
        };
        let num = (f(eps) - f(-eps)) / (2.0 * eps);
        assert!(
            (num - analytic[k]).abs() < 1e-6 * (1.0 + num.abs()),
            "entry {k}: {num} vs {}",
            analytic[k]
        );
    }
}

#[test]
fn vit_shared_gradient_is_the_sum_over_tied_copies() {
    let dev = Dev::seed_from_u64(13);
    let shared = dev.build_module::<SharedVit, f64>();
    let path = scratch("tied-vit").join("v.safetensors");
    shared.save_timm_as(&path, StorageDtype::F64).unwrap();
    let mut plain = dev.build_module::<PlainVit, f64>();
    plain.load_timm(&path).unwrap();
    let x = input(&dev);
    let r: Tensor<Rank2<3, 3>, f64, _> = dev.sample_normal();
    let ys = shared.forward(x.leaky_trace());
    let yp = plain.forward(x.leaky_trace());
    assert_eq!(ys.as_vec(), yp.as_vec());
    let gs = loss(ys, &r).backward();
    let gp = loss(yp, &r).backward();
    // Group 0 is used by layers 0 and 3 (cycle_rev).
    let want: Vec<f64> = gp
        .get(&plain.mlp[0].fc1.weight)
        .as_vec()
        .iter()
        .zip(gp.get(&plain.mlp[3].fc1.weight).as_vec())
        .map(|(a, b)| a + b)
        .collect();
    let got = gs.get(&shared.mlp[0].fc1.weight).as_vec();
    assert!(got
        .iter()
        .zip(&want)
        .all(|(a, b)| (a - b).abs() < 1e-10 * (1.0 + b.abs())));
}

#[test]
fn shared_checkpoints_save_every_layer_and_check_tied_copies() {
    let dev = Dev::default();
    // A shared model saves tied copies under every layer's keys.
    let m = dev.build_module::<SharedSmallMixer, f32>();
    let path = scratch("tied-keys").join("m.safetensors");
    m.save_timm(&path).unwrap();
    let t = spin_core::checkpoint::read_tensors(&path, &std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(t["blocks.0.1.weight"].1, t["blocks.1.1.weight"].1);
    assert_eq!(t["blocks.0.1.weight"].0, [32, 32, 1, 1]);
    assert_ne!(t["blocks.1.1.weight"].1, t["blocks.2.1.weight"].1);
    // The timm fixture has four different pointwise convs: loading it into a shared model names
    // the copies that differ.
    let mut m = dev.build_module::<SharedSmallMixer, f32>();
    let err = m.load_timm(fixture("convmixer_small.safetensors")).unwrap_err();
    match &err {
        Error::TiedDiffer { first, other, .. } => {
            assert_eq!(first, "blocks.0.1.weight");
            assert_eq!(other, "blocks.1.1.weight");
        }
        e => panic!("expected TiedDiffer, got {e}"),
    }
    assert!(err.to_string().contains("blocks.1.1.weight"));
}

#[test]
fn checkpoint_errors_name_the_key_and_shapes() {
    let dev = Dev::default();
    // A smaller model: every tensor has the wrong shape.
    let mut m = dev.build_module::<PlainMixer, f32>();
    let err = m
        .load_timm(fixture("convmixer_small.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("stem.0.weight") && err.contains("[8, 3, 2, 2]") && err.contains("[32, 3, 2, 2]"),
        "{err}"
    );
    // A ViT checkpoint into a ConvMixer: the first missing key is named.
    let err = m.load_timm(fixture("vit_small.safetensors")).unwrap_err();
    assert!(
        matches!(&err, Error::MissingKey { key, .. } if key == "stem.0.weight"),
        "{err}"
    );
    // An extra key.
    let mut small = dev.build_module::<PlainMixer, f32>();
    let path = scratch("extra").join("m.safetensors");
    small.save_timm(&path).unwrap();
    let mut tensors = spin_core::checkpoint::read_tensors(&path, &std::fs::read(&path).unwrap()).unwrap();
    tensors.insert("blocks.9.1.weight".into(), (vec![1], vec![0.0]));
    let views: Vec<(String, safetensors_view::Owned)> = tensors
        .into_iter()
        .filter(|(k, _)| !k.ends_with("num_batches_tracked"))
        .map(|(k, (s, v))| (k, safetensors_view::Owned::f32(s, &v)))
        .collect();
    safetensors_view::write(&path, views);
    let err = small.load_timm(&path).unwrap_err();
    assert!(
        matches!(&err, Error::UnexpectedKey { key, .. } if key == "blocks.9.1.weight"),
        "{err}"
    );
    // A missing file.
    let err = small.load_timm(path.with_extension("nope")).unwrap_err();
    assert!(matches!(err, Error::Io { .. }));
}

/// Writing arbitrary safetensors files for the error tests.
mod safetensors_view {
    use safetensors::tensor::{Dtype, TensorView};
    pub struct Owned {
        shape: Vec<usize>,
        bytes: Vec<u8>,
    }
    impl Owned {
        pub fn f32(shape: Vec<usize>, v: &[f64]) -> Self {
            Self {
                shape,
                bytes: v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect(),
            }
        }
    }
    pub fn write(path: &std::path::Path, t: Vec<(String, Owned)>) {
        let views: Vec<(String, TensorView)> = t
            .iter()
            .map(|(k, o)| {
                (
                    k.clone(),
                    TensorView::new(Dtype::F32, o.shape.clone(), &o.bytes).unwrap(),
                )
            })
            .collect();
        safetensors::tensor::serialize_to_file(views, &None, path).unwrap();
    }
}
