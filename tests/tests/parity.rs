//! Parity with the real timm: logits of models loaded from committed fixtures made by
//! `scripts/make_fixtures.py` (timm 1.0.31, torch 2.15) must match to 1e-5 of the largest logit, f32.
use spin_core::prelude::*;
use spin_tests::{fixture, rel_err, tensor};

#[convmixer(dim = 32, kernel = 5, patch = 2, image = 16, classes = 10, act = gelu, depth = 4)]
struct SmallMixer;

#[convmixer(dim = 24, kernel = 3, patch = 4, image = 16, classes = 7, act = relu, depth = 3)]
struct SmallReluMixer;

#[vit(dim = 32, heads = 4, patch = 4, image = 16, classes = 10, depth = 3)]
struct SmallVit;

#[vit(dim = 40, heads = 5, patch = 4, image = 20, classes = 6)]
#[shared_blocks(depth = 4, groups = 2, pattern = strided, share = attn_mlp)]
struct SharedOddVit;

const TOL: f64 = 1e-5;

fn as_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}
fn as_f64(v: Vec<f32>) -> Vec<f64> {
    v.into_iter().map(|x| x as f64).collect()
}

#[test]
fn convmixer_gelu_matches_timm_eval_and_train() {
    let dev = Cpu::default();
    let mut m = dev.build_module::<SmallMixer, f32>();
    m.load_timm(fixture("convmixer_small.safetensors")).unwrap();
    let (shape, x) = tensor("convmixer_small_io.safetensors", "input");
    assert_eq!(shape, [3, 3, 16, 16]);
    let x: Tensor<Rank4<3, 3, 16, 16>, f32, _> = dev.tensor(as_f32(&x));
    let logits: Tensor<Rank2<3, 10>, f32, _> = m.forward(x.clone());
    let (_, want) = tensor("convmixer_small_io.safetensors", "logits");
    let err = rel_err(&as_f64(logits.as_vec()), &want);
    eprintln!("convmixer eval err {err:e}");
    assert!(err < TOL, "eval logits differ from timm by {err:e}");

    // Training mode: batch statistics, and the running statistics move as PyTorch's do.
    let train = m.forward_mut(x);
    let (_, want) = tensor("convmixer_small_io.safetensors", "logits_train");
    let err = rel_err(&as_f64(train.as_vec()), &want);
    assert!(err < TOL, "train-mode logits differ from timm by {err:e}");
    let (_, want) = tensor("convmixer_small_io.safetensors", "stem_running_mean_after");
    let err = rel_err(&as_f64(m.stem_bn.running_mean.as_vec()), &want);
    assert!(err < TOL, "running mean after one step differs by {err:e}");
}

#[test]
fn convmixer_relu_matches_timm_with_runtime_batch() {
    let dev = Cpu::default();
    let mut m = dev.build_module::<SmallReluMixer, f32>();
    m.load_timm(fixture("convmixer_relu_small.safetensors")).unwrap();
    let (_, x) = tensor("convmixer_relu_small_io.safetensors", "input");
    // A runtime batch size goes through the same typed forward.
    let x: Tensor<(usize, Const<3>, Const<16>, Const<16>), f32, _> =
        dev.tensor_from_vec(as_f32(&x), (2, Const, Const, Const));
    let logits = m.forward(x);
    assert_eq!(logits.shape().0, 2);
    let (_, want) = tensor("convmixer_relu_small_io.safetensors", "logits");
    let err = rel_err(&as_f64(logits.as_vec()), &want);
    assert!(err < TOL, "logits differ from timm by {err:e}");
}

#[test]
fn vit_matches_timm() {
    let dev = Cpu::default();
    let mut m = dev.build_module::<SmallVit, f32>();
    m.load_timm(fixture("vit_small.safetensors")).unwrap();
    let (_, x) = tensor("vit_small_io.safetensors", "input");
    let x: Tensor<Rank4<2, 3, 16, 16>, f32, _> = dev.tensor(as_f32(&x));
    let logits = m.forward(x.clone());
    let (_, want) = tensor("vit_small_io.safetensors", "logits");
    let err = rel_err(&as_f64(logits.as_vec()), &want);
    assert!(err < TOL, "logits differ from timm by {err:e}");
    // One image at a time gives the same row.
    let one: Tensor<Rank3<3, 16, 16>, f32, _> = dev.tensor(x.as_vec()[..3 * 16 * 16].to_vec());
    let row = m.forward(one);
    let err = rel_err(&as_f64(row.as_vec()), &want[..10]);
    assert!(err < TOL, "single-image logits differ by {err:e}");
}

#[test]
fn f64_models_match_timm_too() {
    let dev = Cpu::default();
    let mut m = dev.build_module::<SmallVit, f64>();
    m.load_timm(fixture("vit_small.safetensors")).unwrap();
    let (_, x) = tensor("vit_small_io.safetensors", "input");
    let x: Tensor<Rank4<2, 3, 16, 16>, f64, _> = dev.tensor(x);
    let (_, want) = tensor("vit_small_io.safetensors", "logits");
    // timm ran in f32, so f64 agrees to f32 precision.
    assert!(rel_err(&m.forward(x).as_vec(), &want) < TOL);
}

#[test]
fn saved_checkpoint_round_trips_exactly() {
    let dev = Cpu::default();
    let mut m = dev.build_module::<SmallMixer, f32>();
    m.load_timm(fixture("convmixer_small.safetensors")).unwrap();
    let dir = spin_tests::scratch("roundtrip");
    let path = dir.join("m.safetensors");
    m.save_timm(&path).unwrap();
    let mut m2 = dev.build_module::<SmallMixer, f32>();
    m2.load_timm(&path).unwrap();
    assert_eq!(m.pw[3].weight.as_vec(), m2.pw[3].weight.as_vec());
    assert_eq!(m.bn2[1].running_var.as_vec(), m2.bn2[1].running_var.as_vec());
    // The same keys timm wrote, plus nothing else.
    let ours = spin_core::checkpoint::read_tensors(&path, &std::fs::read(&path).unwrap()).unwrap();
    let theirs = spin_core::checkpoint::read_tensors(
        &fixture("convmixer_small.safetensors"),
        &std::fs::read(fixture("convmixer_small.safetensors")).unwrap(),
    )
    .unwrap();
    assert_eq!(ours.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>());
}

#[convmixer(dim = 40, kernel = 3, patch = 2, image = 8, classes = 5, act = gelu, variant = spin, depth = 2)]
struct SpinVariantMixer;

/// Inference runs each half-block as one fused pass; a traced forward composes the ops. Both must
/// agree (f64, 1e-12), here for SPIN's variant (the extra residual) and a width of 2.5 vectors,
/// with the 4 images in groups of two per task (1 thread), one per task (3) and all in each pass
/// (5).
#[test]
fn fused_inference_equals_the_composed_ops() {
    let dev = Cpu::seed_from_u64(11);
    let mut m = dev.build_module::<SpinVariantMixer, f64>();
    // Non-trivial running statistics, so the folded BatchNorm is exercised.
    let x: Tensor<Rank4<4, 3, 8, 8>, f64, _> = dev.sample_normal();
    let _ = m.forward_mut(x.clone());
    let composed = m.forward(x.clone().trace(m.alloc_grads())).as_vec();
    for threads in [1, 3, 5] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let fused = pool.install(|| m.forward(x.clone()).as_vec());
        let err = rel_err(&fused, &composed);
        assert!(err < 1e-12, "{threads} threads: {err:e}");
    }
}

/// ViT inference runs every block as fused passes on host buffers (AVX-512 gemm, one attention
/// task per image and block of query rows); a traced forward composes dfdx ops. Both must agree
/// (f64, 1e-12) for a shared model with 26 tokens, 5 heads of 8 and a batch of 3.
#[test]
fn fused_vit_inference_equals_the_composed_ops() {
    let dev = Cpu::seed_from_u64(12);
    let m = dev.build_module::<SharedOddVit, f64>();
    let x: Tensor<Rank4<3, 3, 20, 20>, f64, _> = dev.sample_normal();
    let fused = m.forward(x.clone()).as_vec();
    let composed = m.forward(x.trace(m.alloc_grads())).as_vec();
    let err = rel_err(&fused, &composed);
    assert!(err < 1e-12, "{err:e}");
}

/// Inference keeps the blocks' re-laid-out weights between calls; every way of changing a weight
/// (writing in place, replacing a tensor, loading values) must show in the next forward pass.
#[test]
fn cached_inference_weights_follow_every_update() {
    let dev = Cpu::seed_from_u64(13);
    let mut m = dev.build_module::<SharedOddVit, f64>();
    let x: Tensor<Rank4<2, 3, 20, 20>, f64, _> = dev.sample_normal();
    let check = |m: &spin_core::models::vit::Vit<SharedOddVit, f64, Cpu>, what: &str, before: &[f64]| {
        let fused = m.forward(x.clone()).as_vec();
        let composed = m.forward(x.trace(m.alloc_grads())).as_vec();
        assert!(rel_err(&fused, &composed) < 1e-12, "{what}: stale weights");
        assert!(
            rel_err(&fused, before) > 1e-6,
            "{what}: the update changed nothing"
        );
        fused
    };
    let y0 = m.forward(x.clone()).as_vec();
    assert_eq!(m.forward(x.clone()).as_vec(), y0, "a second call differs");
    m.attn[1].qkv.weight[[5, 7]] += 1.0;
    let y1 = check(&m, "in-place write", &y0);
    m.mlp[0].fc2.weight = dev.sample_normal();
    let y2 = check(&m, "replaced tensor", &y1);
    let mut w = m.norm2[3].weight.as_vec();
    w[0] = 3.0;
    m.norm2[3].weight.copy_from(&w);
    check(&m, "copied-in values", &y2);
}

#[convmixer(dim = 200, kernel = 3, patch = 2, image = 8, classes = 5, act = gelu, variant = spin)]
#[shared_blocks(depth = 4, groups = 2, pattern = strided)]
struct WideSharedMixer;

/// A ConvMixer's inference keeps its trunk's weights (f32: the pointwise ones packed, with 200
/// channels crossing the packed kernel's inner block and ending in a one-vector panel) between
/// calls; the fused pass must agree with the composed ops (f32, 1e-5) after each way of changing
/// a weight while they are kept: a write in place, new running statistics, a replaced tensor.
#[test]
fn cached_mixer_weights_follow_every_update() {
    let dev = Cpu::seed_from_u64(14);
    let mut m = dev.build_module::<WideSharedMixer, f32>();
    let x: Tensor<Rank4<2, 3, 8, 8>, f32, _> = dev.sample_normal();
    let check = |m: &spin_core::models::convmixer::ConvMixer<WideSharedMixer, f32, Cpu>,
                 what: &str,
                 before: &[f64]| {
        let fused = as_f64(m.forward(x.clone()).as_vec());
        let composed = as_f64(m.forward(x.trace(m.alloc_grads())).as_vec());
        let err = rel_err(&fused, &composed);
        assert!(err < TOL, "{what}: fused against composed {err:e}");
        assert!(
            rel_err(&fused, before) > 1e-3,
            "{what}: the update changed nothing"
        );
        // The traced pass dropped the kept weights; keep them again before the next update.
        assert_eq!(as_f64(m.forward(x.clone()).as_vec()), fused, "{what}: refilled");
        fused
    };
    let y0 = as_f64(m.forward(x.clone()).as_vec());
    assert_eq!(as_f64(m.forward(x.clone()).as_vec()), y0, "a second call differs");
    m.pw[1].weight[[5, 7, 0, 0]] += 1.0;
    let y1 = check(&m, "in-place write", &y0);
    let _ = m.forward_mut(x.clone());
    let y2 = check(&m, "running statistics", &y1);
    m.dw[2].weight = dev.sample_normal();
    check(&m, "replaced tensor", &y2);
}
