//! Half precision: f16/bf16 storage round trips, f16 inference against the timm fixtures.
use spin_core::checkpoint::{read_tensors, StorageDtype, TimmCheckpoint};
use spin_core::dfdx::dtypes::f16;
use spin_core::prelude::*;
use spin_tests::{fixture, rel_err, scratch, tensor};

#[convmixer(dim = 32, kernel = 5, patch = 2, image = 16, classes = 10, act = gelu, depth = 4)]
struct SmallMixer;

#[vit(dim = 32, heads = 4, patch = 4, image = 16, classes = 10, depth = 3)]
struct SmallVit;

fn values(path: &std::path::Path) -> std::collections::BTreeMap<String, (Vec<usize>, Vec<f64>)> {
    read_tensors(path, &std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn storage_dtypes_round_trip_within_their_rounding() {
    let dev = Cpu::default();
    let mut m = dev.build_module::<SmallMixer, f32>();
    m.load_timm(fixture("convmixer_small.safetensors")).unwrap();
    let dir = scratch("half-roundtrip");
    let reference = values(&fixture("convmixer_small.safetensors"));
    // (dtype, relative rounding: half an ulp of the format's mantissa)
    for (dtype, rel) in [
        (StorageDtype::F32, 0.0),
        (StorageDtype::F16, 2f64.powi(-11)),
        (StorageDtype::BF16, 2f64.powi(-8)),
    ] {
        let path = dir.join(format!("{dtype:?}.safetensors"));
        m.save_timm_as(&path, dtype).unwrap();
        let mut back = dev.build_module::<SmallMixer, f32>();
        back.load_timm(&path).unwrap(); // F16 and BF16 files load into an f32 model
        let saved = values(&path);
        for (k, (_, want)) in reference
            .iter()
            .filter(|(k, _)| !k.ends_with("num_batches_tracked"))
        {
            for (a, b) in saved[k].1.iter().zip(want) {
                // f16 subnormals round to a fixed step of 2^-24.
                assert!(
                    (a - b).abs() <= rel * b.abs() + if rel > 0.0 { 6e-8 } else { 0.0 },
                    "{dtype:?} {k}: {a} vs {b}"
                );
            }
        }
        if dtype == StorageDtype::F32 {
            assert_eq!(back.pw[2].weight.as_vec(), m.pw[2].weight.as_vec());
        }
    }
    // The tensor data of the f16 file is half that of the f32 one (the JSON header aside).
    let data = |d: &str| {
        let b = std::fs::read(dir.join(format!("{d}.safetensors"))).unwrap();
        (b.len() - 8 - u64::from_le_bytes(b[..8].try_into().unwrap()) as usize) as f64
    };
    assert!(data("F16") < 0.55 * data("F32") && data("BF16") == data("F16"));
}

#[test]
fn values_that_overflow_f16_are_an_error_naming_the_key() {
    let dev = Cpu::default();
    let mut m = dev.build_module::<SmallMixer, f32>();
    let mut w = m.head.weight.as_vec();
    w[3] = 1e6;
    m.head.weight.copy_from(&w);
    let path = scratch("half-overflow").join("m.safetensors");
    let err = m.save_timm_as(&path, StorageDtype::F16).unwrap_err();
    assert!(
        matches!(&err, spin_core::Error::Overflow { key, .. } if key == "head.weight"),
        "{err}"
    );
    assert!(!path.exists(), "nothing is written on error");
    // bf16 has f32's range.
    m.save_timm_as(&path, StorageDtype::BF16).unwrap();
}

/// f16 keeps 11 significant bits (unit roundoff u = 2^-11 ≈ 4.9e-4). Each logit ends a chain of
/// rounded multiply-adds through 4–5 layers, so an error of a few u relative to the largest logit
/// is expected: measured 1.8e-3 (ConvMixer) and 1.1e-3 (ViT), about 4u and 2u. The bound, 1e-2
/// (about 20u), leaves room for other machines' summation orders and still catches a wrong layer,
/// which moves logits by O(1).
const F16_TOL: f64 = 1e-2;

#[test]
fn f16_inference_tracks_timm_on_the_fixtures() {
    let dev = Cpu::default();
    let mut m = dev.build_module::<SmallMixer, f32>();
    m.load_timm(fixture("convmixer_small.safetensors")).unwrap();
    let m16 = m.to_dtype::<f16>();
    let (_, x) = tensor("convmixer_small_io.safetensors", "input");
    let x: Tensor<Rank4<3, 3, 16, 16>, f32, _> = dev.tensor(x.iter().map(|&v| v as f32).collect::<Vec<_>>());
    let y = m16.forward(x.to_dtype::<f16>()).to_dtype::<f32>();
    let (_, want) = tensor("convmixer_small_io.safetensors", "logits");
    let got: Vec<f64> = y.as_vec().iter().map(|&v| v as f64).collect();
    let err = rel_err(&got, &want);
    eprintln!("convmixer f16 vs timm f32: {err:e}");
    assert!(err < F16_TOL, "{err}");

    // A ViT built directly in f16 and loaded from the f32 checkpoint.
    let mut v = dev.build_module::<SmallVit, f16>();
    v.load_timm(fixture("vit_small.safetensors")).unwrap();
    let (_, x) = tensor("vit_small_io.safetensors", "input");
    let x: Tensor<Rank4<2, 3, 16, 16>, f16, _> =
        dev.tensor(x.iter().map(|&v| f16::from_f64(v)).collect::<Vec<_>>());
    let got: Vec<f64> = v.forward(x).as_vec().iter().map(|v| v.to_f64()).collect();
    let (_, want) = tensor("vit_small_io.safetensors", "logits");
    let err = rel_err(&got, &want);
    eprintln!("vit f16 vs timm f32: {err:e}");
    assert!(err < F16_TOL, "{err}");
}
