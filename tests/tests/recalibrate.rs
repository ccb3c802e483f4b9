//! BatchNorm recalibration: with one calibration batch, the running statistics become exactly
//! that batch's (mean, unbiased variance), computed here by hand for the stem's BatchNorm.
//! Recalibration draws its images evenly across classes ([`Dataset::stratified`]). A refit brings a
//! mean-fused ConvMixer back towards its source, and the model it writes gives the logits the
//! refit measured.
//!
//! [`Dataset::stratified`]: spin_core::data::Dataset::stratified
use spin_core::data::{self, DataConfig, DataSpec};
use spin_core::fusion::Reduction;
use spin_core::prelude::*;
use spin_core::train::{recalibrate_bn, refit_fused, Classifier, Runner};

#[convmixer(dim = 4, kernel = 3, patch = 2, image = 4, classes = 2, act = relu, depth = 2)]
struct Tiny;

#[test]
fn one_batch_gives_that_batchs_statistics() {
    let dev = Cpu::seed_from_u64(3);
    let mut model: Box<dyn Classifier> = Box::new(Runner::new(dev.build_module::<Tiny, f32>(), dev));
    let data = data::load(&DataSpec::Digits, &DataConfig::centred(4))
        .unwrap()
        .test;
    let batch = 16;
    let used = recalibrate_bn(model.as_mut(), &data, 1, batch).unwrap();
    assert_eq!(used, batch);
    let state = model.state_tensors();
    let (w, b) = (&state["stem.0.weight"].1, &state["stem.0.bias"].1);
    // The stem by hand on the batch recalibration drew (evenly across classes, seed 0): a 2×2
    // stride-2 conv on each of the 2×2 patches, then ReLU.
    let (x, _) = data.gather(&data.stratified(batch, 0)).unwrap();
    let mut rows: Vec<[f64; 4]> = Vec::new();
    for img in x.chunks(3 * 16) {
        for (py, px) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            let mut out = [0.0; 4];
            for (o, v) in out.iter_mut().enumerate() {
                let mut s = b[o];
                for c in 0..3 {
                    for ky in 0..2 {
                        for kx in 0..2 {
                            let pix = img[c * 16 + (2 * py + ky) * 4 + 2 * px + kx] as f64;
                            s += w[((o * 3 + c) * 2 + ky) * 2 + kx] * pix;
                        }
                    }
                }
                *v = s.max(0.0);
            }
            rows.push(out);
        }
    }
    let n = rows.len() as f64;
    for c in 0..4 {
        let mean = rows.iter().map(|r| r[c]).sum::<f64>() / n;
        let var = rows.iter().map(|r| (r[c] - mean).powi(2)).sum::<f64>() / (n - 1.0);
        let (rm, rv) = (
            state["stem.2.running_mean"].1[c],
            state["stem.2.running_var"].1[c],
        );
        assert!(
            (rm - mean).abs() <= 1e-5 * (1.0 + mean.abs()),
            "channel {c}: mean {rm} vs {mean}"
        );
        assert!(
            (rv - var).abs() <= 1e-5 * (1.0 + var.abs()),
            "channel {c}: var {rv} vs {var}"
        );
    }
}

#[test]
fn models_without_batchnorm_are_refused() {
    let mut vit = zoo::build("digits_vit_64_6", 0).unwrap();
    let data = data::load(&DataSpec::Digits, &DataConfig::centred(8))
        .unwrap()
        .test;
    let err = recalibrate_bn(vit.as_mut(), &data, 1, 8).unwrap_err().to_string();
    assert!(err.contains("no BatchNorm"), "{err}");
}

#[convmixer(dim = 16, kernel = 3, patch = 1, image = 8, classes = 10, depth = 4)]
struct Source;
#[convmixer(dim = 16, kernel = 3, patch = 1, image = 8, classes = 10)]
#[shared_blocks(depth = 4, groups = 2, pattern = strided)]
struct SharedPointwise;
#[convmixer(dim = 16, kernel = 3, patch = 1, image = 8, classes = 10, depth = 4, variant = spin)]
struct SpinSource;
#[convmixer(dim = 16, kernel = 3, patch = 1, image = 8, classes = 10, variant = spin)]
#[shared_blocks(depth = 4, groups = 2, pattern = sequential, share = both)]
struct SpinSharedBoth;

fn mse(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(x - y).powi(2))
        .sum::<f64>()
        / a.len() as f64
}

/// Mean-fuses a random `source` into `shared`, refits it for two passes on 64 digits and checks
/// the error fell by half and the written model's logits have the error the refit reported.
fn refit_case(source: Box<dyn Classifier>, mut shared: Box<dyn Classifier>) {
    let data = data::load(&DataSpec::Digits, &DataConfig::centred(8))
        .unwrap()
        .test;
    let teacher = source.state_tensors();
    shared.fuse_from(&teacher, Reduction::Mean).unwrap();
    let errors = refit_fused(shared.as_mut(), &teacher, &data, 64, 2, &mut |_, _| {}).unwrap();
    assert_eq!(errors.len(), 3);
    let best = errors.iter().copied().fold(f64::INFINITY, f64::min);
    assert!(best < 0.5 * errors[0], "{errors:?}");
    let (x, _) = data.gather(&data.stratified(64, 0)).unwrap();
    let now = mse(&shared.predict(&x, 64), &source.predict(&x, 64));
    // The refit's f32 host forward against the model's kernels: 0.1 % of the error.
    assert!(
        (now - best).abs() <= 1e-3 * best + 1e-9,
        "model {now} vs refit {best}"
    );
}

#[test]
fn refit_brings_a_fused_mixer_back_towards_its_source() {
    let dev = Cpu::seed_from_u64(5);
    let source = Runner::new(dev.build_module::<Source, f32>(), dev.clone());
    let shared = Runner::new(dev.build_module::<SharedPointwise, f32>(), dev.clone());
    refit_case(Box::new(source), Box::new(shared));
    let source = Runner::new(dev.build_module::<SpinSource, f32>(), dev.clone());
    let shared = Runner::new(dev.build_module::<SpinSharedBoth, f32>(), dev);
    refit_case(Box::new(source), Box::new(shared));
}

#[test]
fn refit_refuses_what_it_cannot_fit() {
    let data = data::load(&DataSpec::Digits, &DataConfig::centred(8))
        .unwrap()
        .test;
    let mut vit = zoo::build("digits_vit_64_6_ws2_sequential", 0).unwrap();
    let teacher = zoo::build("digits_vit_64_6", 0).unwrap().state_tensors();
    let err = refit_fused(vit.as_mut(), &teacher, &data, 8, 1, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("ConvMixers only"), "{err}");
    let mut mixer = zoo::build("digits_convmixer_64_8_ws2_sequential", 0).unwrap();
    let err = refit_fused(mixer.as_mut(), &teacher, &data, 8, 1, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("<unshared source>: missing tensor `blocks.0.0.fn.0.weight`"),
        "{err}"
    );
}
