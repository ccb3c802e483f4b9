//! BatchNorm recalibration: with one calibration batch, the running statistics become exactly
//! that batch's (mean, unbiased variance), computed here by hand for the stem's BatchNorm.
//! Recalibration draws its images evenly across classes ([`Dataset::stratified`]).
//!
//! [`Dataset::stratified`]: spin_core::data::Dataset::stratified
use spin_core::data::{self, DataConfig, DataSpec};
use spin_core::prelude::*;
use spin_core::train::{recalibrate_bn, Classifier, Runner};

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
