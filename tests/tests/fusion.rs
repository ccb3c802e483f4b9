//! Weight fusion: a shared model from an unshared one, and SPIN's fusion-aware training.
use spin_core::fusion::{fuse_into, tensor_map, Fusion, Reduction};
use spin_core::models::SpinModel;
use spin_core::prelude::*;
use spin_core::train::{AdamW, Classifier, Runner, StepParams};

#[convmixer(dim = 8, kernel = 3, patch = 2, image = 8, classes = 5, act = gelu, depth = 4)]
struct Plain;

#[convmixer(dim = 8, kernel = 3, patch = 2, image = 8, classes = 5, act = gelu)]
#[shared_blocks(depth = 4, groups = 2, pattern = sequential)]
struct SharedSeq;

#[convmixer(dim = 8, kernel = 3, patch = 2, image = 8, classes = 5, act = gelu)]
#[shared_blocks(depth = 4, groups = 2, pattern = strided, share = both)]
struct SharedBoth;

#[vit(dim = 8, heads = 2, patch = 4, image = 8, classes = 3, depth = 4)]
struct PlainVit;

#[vit(dim = 8, heads = 2, patch = 4, image = 8, classes = 3)]
#[shared_blocks(depth = 4, groups = 2, pattern = cycle_rev)]
struct SharedVit;

fn images(dev: &Cpu, n: usize) -> Tensor<(usize, usize, usize, usize), f32, Cpu> {
    dev.sample_normal_like(&(n, 3, 8, 8))
}

#[test]
fn fusing_a_model_whose_group_layers_are_identical_reproduces_it_exactly() {
    let dev = Cpu::seed_from_u64(1);
    // An unshared model whose layers in each group are tied copies.
    let shared = dev.build_module::<SharedSeq, f32>();
    let mut plain = dev.build_module::<Plain, f32>();
    fuse_into(&mut plain, &tensor_map(&shared), Reduction::Mean, &|_, _| None).unwrap();
    for reduction in [
        Reduction::Mean,
        Reduction::ChooseFirst,
        Reduction::ChannelWeightedMean,
    ] {
        let mut fused = dev.build_module::<SharedSeq, f32>();
        let report = fuse_into(&mut fused, &tensor_map(&plain), reduction, &|_, _| None).unwrap();
        assert_eq!(report.fused, 2 * 2, "two groups × (weight, bias)");
        let x = images(&dev, 3);
        assert_eq!(
            fused.forward_dyn(x.clone()).as_vec(),
            plain.forward_dyn(x).as_vec(),
            "{reduction:?}"
        );
    }
    // The same holds for a ViT sharing attention and MLP.
    let sv = dev.build_module::<SharedVit, f32>();
    let mut pv = dev.build_module::<PlainVit, f32>();
    fuse_into(&mut pv, &tensor_map(&sv), Reduction::Mean, &|_, _| None).unwrap();
    let mut fv = dev.build_module::<SharedVit, f32>();
    fuse_into(&mut fv, &tensor_map(&pv), Reduction::Mean, &|_, _| None).unwrap();
    let x = images(&dev, 2);
    assert_eq!(fv.forward_dyn(x.clone()).as_vec(), pv.forward_dyn(x).as_vec());
}

#[test]
fn mean_fusion_averages_each_group_and_copies_the_rest() {
    let dev = Cpu::seed_from_u64(2);
    let plain = dev.build_module::<Plain, f64>();
    let mut fused = dev.build_module::<SharedSeq, f64>();
    fuse_into(&mut fused, &tensor_map(&plain), Reduction::Mean, &|_, _| None).unwrap();
    // Group 1 is layers 2 and 3 (sequential).
    let (a, b) = (plain.pw[2].weight.as_vec(), plain.pw[3].weight.as_vec());
    let want: Vec<f64> = a.iter().zip(&b).map(|(x, y)| (x + y) / 2.0).collect();
    assert_eq!(fused.pw[1].weight.as_vec(), want);
    // Depthwise convs and BatchNorms stay per layer, copied as they are.
    assert_eq!(fused.dw[3].weight.as_vec(), plain.dw[3].weight.as_vec());
    assert_eq!(
        fused.bn2[2].running_var.as_vec(),
        plain.bn2[2].running_var.as_vec()
    );
    // A model of other dims is refused with the key and shapes.
    let vit = dev.build_module::<PlainVit, f64>();
    assert!(fuse_into(&mut fused, &tensor_map(&vit), Reduction::Mean, &|_, _| None).is_err());
}

/// A few AdamW steps on random images with labels cycling through `classes`.
fn train_steps<M: SpinModel<f32, Cpu> + Send + 'static>(
    runner: &mut Runner<M>,
    dev: &Cpu,
    steps: usize,
    classes: usize,
) {
    let mut opt = AdamW::new(0.01);
    let hp = StepParams {
        lr: 0.05,
        label_smoothing: 0.1,
        clip: Some(1.0),
    };
    for s in 0..steps {
        let x = images(dev, 6).as_vec();
        let labels: Vec<usize> = (0..6).map(|i| (i + s) % classes).collect();
        runner.train_step(&x, &labels, None, &mut opt, &hp).unwrap();
    }
}

#[test]
fn fusion_aware_training_exports_a_plain_shared_model_with_the_same_logits() {
    for (reduction, both) in [
        (Reduction::ChannelWeightedMean, false),
        (Reduction::ScalarWeightedMean, true),
        (Reduction::Mean, false),
    ] {
        let dev = Cpu::seed_from_u64(3);
        let x = images(&dev, 4);
        let base = dev.build_module::<Plain, f32>();
        let start = tensor_map(&base);
        macro_rules! check {
            ($shared:ty) => {{
                let mut m = dev.build_module::<Fusion<Plain, $shared>, f32>();
                m.reduction = reduction;
                spin_core::fusion::FusionMixer::<Plain, $shared, f32, Cpu>::check_pair().unwrap();
                fuse_into(&mut m.base, &start, Reduction::Mean, &|_, _| None).unwrap();
                // Before training, the weighted reductions (coefficients of one) equal the mean.
                let mut mean = dev.build_module::<$shared, f32>();
                fuse_into(&mut mean, &start, Reduction::Mean, &|_, _| None).unwrap();
                let before = m.logits(x.clone()).as_vec();
                let want = mean.forward_dyn(x.clone()).as_vec();
                assert!(
                    before.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5),
                    "{reduction:?}"
                );

                let mut runner = Runner::new(m, dev.clone());
                train_steps(&mut runner, &dev, 5, 5);
                let m = &runner.model;
                // Every layer's original tensor and the coefficients trained.
                let moved = |a: Vec<f32>, b: Vec<f32>| a.iter().zip(&b).any(|(x, y)| x != y);
                assert!(moved(
                    m.base.pw[0].weight.as_vec(),
                    base.pw[0].weight.as_vec()
                ));
                assert!(moved(
                    m.base.pw[1].weight.as_vec(),
                    base.pw[1].weight.as_vec()
                ));
                match reduction {
                    Reduction::ChannelWeightedMean => {
                        assert!(m.gamma_pw[2].as_vec().iter().any(|&g| g != 1.0))
                    }
                    Reduction::ScalarWeightedMean => assert!(m.alpha_pw[2].as_vec()[0] != 1.0),
                    _ => {}
                }
                let exported = m.export_fused().unwrap();
                assert_eq!(exported.num_trainable_params(), <$shared>::PARAMS);
                let train_logits = m.logits(x.clone()).as_vec();
                let export_logits = exported.forward_dyn(x.clone()).as_vec();
                let scale = train_logits.iter().fold(0f32, |a, v| a.max(v.abs()));
                for (a, b) in train_logits.iter().zip(&export_logits) {
                    assert!(
                        (a - b).abs() <= 1e-5 * scale.max(1.0),
                        "{reduction:?}: {a} vs {b}"
                    );
                }
            }};
        }
        if both {
            check!(SharedBoth);
        } else {
            check!(SharedSeq);
        }
    }
}

#[test]
fn fusion_pairs_must_match() {
    type Bad = spin_core::fusion::FusionMixer<SharedSeq, Plain, f32, Cpu>;
    assert!(Bad::check_pair().is_err());
    assert!("nope".parse::<Reduction>().is_err());
    assert_eq!(
        "channel_weighted_mean".parse::<Reduction>().unwrap(),
        Reduction::ChannelWeightedMean
    );
}

#[vit(dim = 8, heads = 2, patch = 4, image = 8, classes = 3)]
#[shared_blocks(depth = 4, groups = 2, pattern = strided, share = mlp)]
struct SharedVitMlp;

#[test]
fn fusion_aware_vits_export_a_plain_shared_model_with_the_same_logits() {
    use spin_core::fusion::{FusionVit, FusionVitOf};
    for (reduction, mlp_only) in [
        (Reduction::ChannelWeightedMean, false),
        (Reduction::ScalarWeightedMean, true),
        (Reduction::Mean, false),
    ] {
        let dev = Cpu::seed_from_u64(4);
        let x = images(&dev, 4);
        let base = dev.build_module::<PlainVit, f32>();
        let start = tensor_map(&base);
        macro_rules! check {
            ($shared:ty) => {{
                FusionVit::<PlainVit, $shared, f32, Cpu>::check_pair().unwrap();
                let mut m = dev.build_module::<FusionVitOf<PlainVit, $shared>, f32>();
                m.reduction = reduction;
                fuse_into(&mut m.base, &start, Reduction::Mean, &|_, _| None).unwrap();
                // Coefficients of one: the weighted reductions start as the mean.
                let mut mean = dev.build_module::<$shared, f32>();
                fuse_into(&mut mean, &start, Reduction::Mean, &|_, _| None).unwrap();
                let before = m.logits(x.clone()).as_vec();
                let want = mean.forward_dyn(x.clone()).as_vec();
                assert!(
                    before.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5),
                    "{reduction:?}"
                );

                let mut runner = Runner::new(m, dev.clone());
                train_steps(&mut runner, &dev, 5, 3);
                let m = &runner.model;
                let moved = |a: Vec<f32>, b: Vec<f32>| a.iter().zip(&b).any(|(x, y)| x != y);
                assert!(moved(
                    m.base.mlp[3].fc1.weight.as_vec(),
                    base.mlp[3].fc1.weight.as_vec()
                ));
                match reduction {
                    Reduction::ChannelWeightedMean => {
                        assert!(m.gamma_fc2[1].as_vec().iter().any(|&g| g != 1.0))
                    }
                    Reduction::ScalarWeightedMean => assert!(m.alpha[2][1].as_vec()[0] != 1.0),
                    _ => {}
                }
                let exported = m.export_fused().unwrap();
                assert_eq!(exported.num_trainable_params(), <$shared>::PARAMS);
                let train_logits = m.logits(x.clone()).as_vec();
                let export_logits = exported.forward_dyn(x.clone()).as_vec();
                let scale = train_logits.iter().fold(0f32, |a, v| a.max(v.abs()));
                for (a, b) in train_logits.iter().zip(&export_logits) {
                    assert!(
                        (a - b).abs() <= 1e-5 * scale.max(1.0),
                        "{reduction:?}: {a} vs {b}"
                    );
                }
            }};
        }
        if mlp_only {
            check!(SharedVitMlp);
        } else {
            check!(SharedVit);
        }
    }
    // A shared model with other dims is refused.
    assert!(FusionVit::<SharedVit, PlainVit, f32, Cpu>::check_pair().is_err());
}

#[test]
fn every_small_zoo_fusion_pair_builds_and_its_model_is_the_shared_member() {
    let mut built = 0;
    for m in zoo::MEMBERS
        .iter()
        .filter(|m| (m.info)().unshared_params < 10_000_000)
    {
        if let Some(fusion) = m.fusion {
            let model = fusion(0, Reduction::ChannelWeightedMean);
            let (got, want) = (model.info(), (m.info)());
            assert_eq!((got.name, got.schedule), (want.name, want.schedule));
            built += 1;
        }
    }
    // The digits ConvMixers and ViTs, deit_tiny's and convmixer_256's shared members.
    assert!(built >= 11, "{built}");
}
