//! The consts a declaration carries, pinned to timm's real numbers (torch.utils.flop_counter / 2
//! for MACs) and to the runtime parameter count of the built module.
use spin_core::prelude::*;

#[convmixer(dim = 768, kernel = 7, patch = 7, image = 224, classes = 1000, act = relu, depth = 32)]
struct ConvMixer768;

#[convmixer(dim = 1536, kernel = 9, patch = 7, image = 224, classes = 1000, depth = 20)]
struct ConvMixer1536;

#[convmixer(dim = 1024, kernel = 9, patch = 14, image = 224, classes = 1000, depth = 20)]
struct ConvMixer1024;

#[vit(dim = 192, heads = 3, patch = 16, image = 224, classes = 1000, depth = 12)]
struct DeitTiny;

#[vit(dim = 384, heads = 6, patch = 16, image = 224, classes = 1000, depth = 12)]
struct DeitSmall;

#[vit(dim = 768, heads = 12, patch = 16, image = 224, classes = 1000, depth = 12)]
struct DeitBase;

#[convmixer(dim = 768, kernel = 7, patch = 7, image = 224, classes = 1000, act = relu)]
#[shared_blocks(depth = 32, groups = 16, pattern = sequential)]
struct ConvMixer768Ws2;

#[convmixer(dim = 768, kernel = 7, patch = 7, image = 224, classes = 1000, act = relu)]
#[shared_blocks(depth = 32, groups = 8, pattern = strided)]
struct WsConvMixer768;

#[vit(dim = 384, heads = 6, patch = 16, image = 224, classes = 1000)]
#[shared_blocks(depth = 12, groups = 6, pattern = sequential, share = attn_mlp)]
struct WsDeitSmall;

#[convmixer(dim = 64, kernel = 5, patch = 2, image = 32, classes = 10, depth = 4)]
struct TinyMixer;

#[vit(dim = 16, heads = 2, patch = 4, image = 8, classes = 3)]
#[shared_blocks(depth = 6, groups = 3, pattern = [0, 1, 1, 2, 2, 0])]
struct ListVit;

#[convmixer(dim = 16, kernel = 3, patch = 2, image = 8, classes = 3, variant = spin)]
#[shared_blocks(depth = 8, groups = 4, pattern = random(seed = 3), share = both)]
struct RandomMixer;

fn mmacs(m: u64) -> u64 {
    (m as f64 / 1e6).round() as u64
}

#[test]
fn params_and_macs_match_timm() {
    assert_eq!(ConvMixer768::PARAMS, 21_110_248);
    assert_eq!(mmacs(ConvMixer768::MACS), 20_677);
    assert_eq!(ConvMixer1536::PARAMS, 51_625_960);
    assert_eq!(mmacs(ConvMixer1536::MACS), 51_099);
    assert_eq!(ConvMixer1024::PARAMS, 24_383_464);
    assert_eq!(mmacs(ConvMixer1024::MACS), 5_949);
    assert_eq!(DeitTiny::PARAMS, 5_717_416);
    assert_eq!(mmacs(DeitTiny::MACS), 1_254);
    assert_eq!(DeitSmall::PARAMS, 22_050_664);
    assert_eq!(mmacs(DeitSmall::MACS), 4_599);
    assert_eq!(DeitBase::PARAMS, 86_567_656);
    assert_eq!(mmacs(DeitBase::MACS), 17_564);
}

#[test]
fn shared_params_match_spin_arithmetic() {
    assert_eq!(ConvMixer768Ws2::PARAMS, 11_660_776);
    assert_eq!(WsConvMixer768::PARAMS, 6_936_040);
    // Sharing does not change the work done.
    assert_eq!(WsConvMixer768::MACS, ConvMixer768::MACS);
    // SPIN's DeiT-S at r = 2: 22.05 M → 11.41 M.
    assert_eq!((WsDeitSmall::PARAMS as f64 / 1e4).round() / 100.0, 11.41);
}

#[test]
fn schedule_depth_groups_and_name() {
    assert_eq!(WsConvMixer768::DEPTH, 32);
    assert_eq!(WsConvMixer768::GROUPS, 8);
    assert_eq!(WsConvMixer768::SCHEDULE[..10], [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]);
    assert_eq!(WsConvMixer768::NAME, "WsConvMixer768");
    assert_eq!(WsDeitSmall::SCHEDULE, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]);
    assert_eq!(ListVit::SCHEDULE, [0, 1, 1, 2, 2, 0]);
    let runtime = Schedule::new(8, 4, &Pattern::Random { seed: 3 }).unwrap();
    assert_eq!(RandomMixer::SCHEDULE.as_slice(), runtime.as_slice());
    assert_eq!(TinyMixer::GROUPS, 4);
    let info = <WsDeitSmall as Describe>::info();
    assert_eq!(
        (info.family, info.share, info.pattern.as_str()),
        (Family::Vit, "attn_mlp", "sequential")
    );
    assert_eq!(info.params, WsDeitSmall::PARAMS);
    assert!((info.compression() - 22_050_664.0 / WsDeitSmall::PARAMS as f64).abs() < 1e-12);
}

#[test]
fn consts_equal_the_built_modules_parameter_count() {
    let dev = Cpu::default();
    assert_eq!(
        dev.build_module::<TinyMixer, f32>().num_trainable_params(),
        TinyMixer::PARAMS
    );
    assert_eq!(
        dev.build_module::<ListVit, f32>().num_trainable_params(),
        ListVit::PARAMS
    );
    assert_eq!(
        dev.build_module::<RandomMixer, f64>().num_trainable_params(),
        RandomMixer::PARAMS
    );
    assert_eq!(
        dev.build_module::<DeitTiny, f32>().num_trainable_params(),
        DeitTiny::PARAMS
    );
    assert_eq!(
        dev.build_module::<WsConvMixer768, f32>().num_trainable_params(),
        WsConvMixer768::PARAMS
    );
}

#[test]
fn declared_models_run_with_fixed_shapes() {
    let dev = Cpu::default();
    let m = dev.build_module::<RandomMixer, f32>();
    let x: Tensor<Rank4<2, 3, 8, 8>, f32, _> = dev.sample_normal();
    let y: Tensor<Rank2<2, 3>, f32, _> = m.forward(x.clone());
    assert!(y.as_vec().iter().all(|v| v.is_finite()));
    let f: Tensor<Rank4<2, 16, 4, 4>, f32, _> = m.forward_features(x);
    assert_eq!(f.shape().concrete(), [2, 16, 4, 4]);
    let v = dev.build_module::<ListVit, f32>();
    let t: Tensor<Rank3<2, 5, 16>, f32, _> = v.forward_features(dev.sample_normal::<Rank4<2, 3, 8, 8>>());
    assert_eq!(t.shape().concrete(), [2, 5, 16]);
}
