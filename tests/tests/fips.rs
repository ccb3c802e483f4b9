//! FiPS: initialisation, parameter counts, block-wise reconstruction, masks and checkpoints.
use spin_core::fips::reconstruct::{block_errors, calibrate, reconstruct};
use spin_core::fips::{self, FipsMlps, FipsPlan, ReconConfig};
use spin_core::models::vit::VitMlps;
use spin_core::models::SpinModel;
use spin_core::prelude::*;
use spin_core::rules::counts::mlp_params;
use spin_core::train::{AdamW, Classifier, Runner, StepParams};
use spin_tests::{rel_err, scratch};

#[vit(dim = 16, heads = 2, patch = 4, image = 8, classes = 3, depth = 4)]
struct Tiny;

#[vit(dim = 16, heads = 2, patch = 4, image = 8, classes = 3, depth = 4)]
#[fips(groups = [[0, 1], [2, 3]], budget = 0.5, sparsity = 0.5)]
struct TinyFips;

fn groups() -> Vec<Vec<usize>> {
    vec![vec![0, 1], vec![2, 3]]
}

fn f64s(v: Vec<f32>) -> Vec<f64> {
    v.into_iter().map(f64::from).collect()
}

/// Every masked-out entry of every V is exactly zero; returns how many entries are masked out.
fn pruned_entries_are_zero<C: spin_core::models::vit::VitConfig>(m: &FipsMlps<C, f32, Cpu>) -> usize {
    let mut pruned = 0;
    for l in &m.layers {
        for (v, mask) in [(&l.v1, &l.m1), (&l.v2, &l.m2)] {
            for (x, k) in v.as_vec().into_iter().zip(mask.as_vec()) {
                if k == 0.0 {
                    assert_eq!(x, 0.0, "a pruned entry moved");
                    pruned += 1;
                }
            }
        }
    }
    pruned
}

#[test]
fn full_rank_initialisation_reproduces_every_mlp_and_the_logits() {
    let dev = Cpu::seed_from_u64(3);
    let dense = dev.build_module::<Tiny, f64>();
    // Full rank (the dimension) and no pruning: U·V reproduces every fc1ᵀ and fc2.
    let plan = FipsPlan {
        groups: groups(),
        budget: 1.0,
        sparsity: 0.0,
        rank: 16,
    };
    let mlps = FipsMlps::from_dense(&dense.mlp, &plan).unwrap();
    let z: Tensor<(usize, usize), f64, Cpu> = dev.sample_normal_like(&(5, 16));
    for i in 0..4 {
        let want = dense.mlp.forward(i, z.clone()).as_vec();
        let got = mlps.forward(i, z.clone()).as_vec();
        assert!(
            rel_err(&got, &want) < 1e-10,
            "block {i}: {}",
            rel_err(&got, &want)
        );
    }
    let x: Tensor<(usize, usize, usize, usize), f64, Cpu> = dev.sample_normal_like(&(2, 3, 8, 8));
    let want = dense.logits(x.clone()).as_vec();
    let mut fips = dense.clone().with_mlps(mlps);
    let got = fips.logits(x.clone()).as_vec();
    assert!(rel_err(&got, &want) < 1e-10, "logits: {}", rel_err(&got, &want));

    // Pruned: inference (fused passes on the formed dense weights) equals the traced forward.
    fips.mlp.prune_to(0.5);
    let fused = fips.logits(x.clone()).as_vec();
    let composed = fips.logits(x.trace(fips.alloc_grads())).as_vec();
    assert!(
        rel_err(&fused, &composed) < 1e-12,
        "pruned: {}",
        rel_err(&fused, &composed)
    );
}

#[test]
fn declared_parameter_counts_follow_the_formula() {
    // r = ⌊8·n·d²·p / (8·n·d·(1 − s) + d)⌋ = ⌊2048 / 144⌋ = 14 for d 16, n 2, p 0.5, s 0.5.
    assert_eq!(TinyFips::RANK, 14);
    assert_eq!(fips::rank(16, 2, 0.5, 0.5), 14);
    // Each group: U (16 × 14) once and half of its four V's (14 × 64) kept; biases per block.
    let mlp = 2 * (16 * 14 + (4 * 14 * 64) / 2) + 4 * (64 + 16);
    assert_eq!(TinyFips::PARAMS, Tiny::PARAMS - 4 * mlp_params(16, 64) + mlp);
    assert_eq!(TinyFips::info().params, TinyFips::PARAMS);
    assert_eq!(TinyFips::FIPS.groups, &[&[0, 1][..], &[2, 3][..]]);

    // The built model: shapes from the declaration, and once pruned, the count the const gives.
    let dev = Cpu::seed_from_u64(4);
    let mut m = dev.build_module::<TinyFips, f32>();
    assert_eq!(m.mlp.groups_and_rank(), (2, 14));
    assert_eq!(m.mlp.groups(), groups());
    assert_eq!(m.mlp.layers[0].v1.shape().0.size(), 14);
    m.mlp.prune_to(0.5);
    assert_eq!(SpinModel::info(&m).params, TinyFips::PARAMS);
    assert_eq!(m.mlp.sparsity(), 0.5);
}

#[test]
fn reconstruction_lowers_the_block_errors_and_keeps_pruned_weights_zero() {
    let dev = Cpu::seed_from_u64(5);
    let dense = dev.build_module::<Tiny, f32>();
    let images: Tensor<(usize, usize, usize, usize), f32, Cpu> = dev.sample_normal_like(&(16, 3, 8, 8));
    let calib = calibrate(&dense, &images.as_vec(), 16, 8);
    assert_eq!(calib.rows, 16 * 5);
    let plan = FipsPlan::new(4, 16, groups(), 0.5, 0.5).unwrap();
    let mut mlps = FipsMlps::from_dense(&dense.mlp, &plan).unwrap();
    let mut one_shot = mlps.clone();
    one_shot.prune_to(0.5);
    let before = block_errors(&one_shot, &calib);
    let cfg = ReconConfig {
        steps: 120,
        lr: 3e-3,
        rows: 80,
        prune_until: 0.25,
        ..Default::default()
    };
    let mut seen = 0;
    let losses = reconstruct(&mut mlps, &calib, 0.5, &cfg, &mut |_, _| seen += 1).unwrap();
    assert_eq!((losses.len(), seen), (120, 120));
    let after = block_errors(&mlps, &calib);
    let (b, a): (f64, f64) = (before.iter().sum(), after.iter().sum());
    assert!(a < 0.7 * b, "block errors {before:?} → {after:?}");
    // With the sparsity held (after step 30) the loss keeps falling.
    let early: f32 = losses[30..40].iter().sum::<f32>() / 10.0;
    let late: f32 = losses[110..].iter().sum::<f32>() / 10.0;
    assert!(late < early, "loss {early} → {late}");
    // Half of every group's V entries are pruned, and exactly zero after 120 optimiser steps.
    let pruned = pruned_entries_are_zero(&mlps);
    assert_eq!(pruned, 4 * 2 * 14 * 64 / 2);
    assert_eq!(mlps.sparsity(), 0.5);
    mlps.check().unwrap();
}

#[test]
fn rigl_keeps_the_exact_sparsity_and_regrows_at_zero() {
    let dev = Cpu::seed_from_u64(6);
    let dense = dev.build_module::<Tiny, f32>();
    let images: Tensor<(usize, usize, usize, usize), f32, Cpu> = dev.sample_normal_like(&(16, 3, 8, 8));
    let calib = calibrate(&dense, &images.as_vec(), 16, 8);
    let plan = FipsPlan::new(4, 16, groups(), 0.5, 0.5).unwrap();
    let mut mlps = FipsMlps::from_dense(&dense.mlp, &plan).unwrap();
    let start = mlps.clone();
    mlps.prune_to(0.5);
    let masks = |m: &FipsMlps<Tiny, f32, Cpu>| -> Vec<f32> {
        m.layers
            .iter()
            .flat_map(|l| l.m1.as_vec().into_iter().chain(l.m2.as_vec()))
            .collect()
    };
    for update in 0..3 {
        let before = masks(&mlps);
        let saved = mlps.open_masks();
        let mut grads = mlps.alloc_grads();
        for i in 0..4 {
            let z = dev.tensor_from_vec(calib.inputs[i].clone(), (calib.rows, 16));
            let y = dev.tensor_from_vec(calib.targets[i].clone(), (calib.rows, 16));
            grads = mse_loss(mlps.forward(i, z.traced(grads)), y).backward();
        }
        let moved = mlps.rigl_step(saved, &grads, 0.3);
        let after = masks(&mlps);
        assert!(moved > 0, "update {update} moved nothing");
        assert_eq!(mlps.sparsity(), 0.5, "update {update}");
        let regrown: Vec<usize> = (0..after.len())
            .filter(|&k| before[k] == 0.0 && after[k] == 1.0)
            .collect();
        assert_eq!(regrown.len(), moved);
        let values: Vec<f32> = mlps
            .layers
            .iter()
            .flat_map(|l| l.v1.as_vec().into_iter().chain(l.v2.as_vec()))
            .collect();
        assert!(
            regrown.iter().all(|&k| values[k] == 0.0),
            "a regrown entry is not zero"
        );
        pruned_entries_are_zero(&mlps);
    }
    // The whole reconstruction with RigL: the sparsity from the start, lower block errors.
    let mut rigl = start.clone();
    let cfg = ReconConfig {
        steps: 120,
        lr: 3e-3,
        rows: 80,
        schedule: fips::SparseSchedule::Rigl,
        ..Default::default()
    };
    let mut one_shot = start;
    one_shot.prune_to(0.5);
    let before: f64 = block_errors(&one_shot, &calib).iter().sum();
    reconstruct(&mut rigl, &calib, 0.5, &cfg, &mut |_, _| {}).unwrap();
    let after: f64 = block_errors(&rigl, &calib).iter().sum();
    assert!(after < 0.7 * before, "{before} → {after}");
    assert_eq!(rigl.sparsity(), 0.5);
    pruned_entries_are_zero(&rigl);
    rigl.check().unwrap();
}

#[test]
fn end_to_end_fine_tuning_leaves_pruned_entries_at_zero() {
    let dev = Cpu::seed_from_u64(6);
    let mut model = dev.build_module::<TinyFips, f32>();
    model.mlp.prune_to(0.5);
    let start = model.mlp.layers[1].v2.as_vec();
    let mut runner = Runner::new(model, dev.clone());
    let mut opt = AdamW::new(0.05);
    let x: Tensor<(usize, usize, usize, usize), f32, Cpu> = dev.sample_normal_like(&(4, 3, 8, 8));
    let hp = StepParams {
        lr: 1e-2,
        label_smoothing: 0.0,
        clip: None,
    };
    for _ in 0..3 {
        runner
            .train_step(&x.as_vec(), &[0, 1, 2, 0], None, &mut opt, &hp)
            .unwrap();
    }
    let end = runner.model.mlp.layers[1].v2.as_vec();
    assert!(
        start.iter().zip(&end).any(|(a, b)| a != b),
        "training changed nothing"
    );
    assert_eq!(pruned_entries_are_zero(&runner.model.mlp), 4 * 2 * 14 * 64 / 2);
}

#[test]
fn checkpoints_round_trip_under_clear_keys_and_are_checked() {
    let dir = scratch("fips-ckpt");
    let dev = Cpu::seed_from_u64(7);
    let mut model = dev.build_module::<TinyFips, f32>();
    model.mlp.prune_to(0.5);
    let path = dir.join("fips.safetensors");
    model.save_timm(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let keys = spin_core::checkpoint::read_tensors(&path, &bytes).unwrap();
    assert_eq!(keys["fips.bases"].0, vec![2, 16, 14]);
    assert_eq!(keys["fips.block_group"].1, vec![0.0, 0.0, 1.0, 1.0]);
    // V's kept values and its mask as bits: 14 × 64 entries, half kept over the group.
    let nnz = keys["blocks.3.mlp.fc2.v"].0[0];
    assert_eq!(keys["blocks.3.mlp.fc2.mask"].0, vec![14, 8]);
    let bits: u32 = keys["blocks.3.mlp.fc2.mask"]
        .1
        .iter()
        .map(|&b| (b as u8).count_ones())
        .sum();
    assert_eq!(bits as usize, nnz);
    assert_eq!(keys["blocks.3.mlp.fc2.bias"].0, vec![16]);
    assert!(keys.contains_key("blocks.3.attn.qkv.weight"));
    assert!(!keys.contains_key("blocks.3.mlp.fc2.weight"));
    // Smaller than the dense model's file, though the tiny model's attention is most of it.
    let dense_path = dir.join("dense.safetensors");
    dev.build_module::<Tiny, f32>().save_timm(&dense_path).unwrap();
    let size = |p: &std::path::Path| std::fs::metadata(p).unwrap().len();
    assert!(
        size(&path) < size(&dense_path),
        "{} vs {}",
        size(&path),
        size(&dense_path)
    );
    // The description's size on disk is the file's, up to the safetensors header.
    let predicted = SpinModel::info(&model).size_bytes(4) as u64;
    assert!(
        (predicted..predicted + 16_384).contains(&size(&path)),
        "{predicted} vs {}",
        size(&path)
    );

    let mut loaded = Cpu::seed_from_u64(8).build_module::<TinyFips, f32>();
    loaded.load_timm(&path).unwrap();
    let x: Tensor<(usize, usize, usize, usize), f32, Cpu> = dev.sample_normal_like(&(2, 3, 8, 8));
    assert_eq!(loaded.logits(x.clone()).as_vec(), model.logits(x).as_vec());
    assert_eq!(loaded.mlp.sparsity(), 0.5);

    // Tampered files are refused with the key at fault, and the model is left as it was.
    let before = loaded.mlp.layers[2].v1.as_vec();
    let tamper = |key: &str, edit: &dyn Fn(&mut Vec<f32>)| {
        let mut tensors = spin_core::checkpoint::read_tensors(&path, &bytes).unwrap();
        let out = dir.join("tampered.safetensors");
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut data: Vec<(String, Vec<usize>, safetensors::Dtype, Vec<u8>)> = Vec::new();
        for (name, view) in st.tensors() {
            if name == key {
                let (_, v) = tensors.remove(key).unwrap();
                let mut v: Vec<f32> = v.into_iter().map(|x| x as f32).collect();
                edit(&mut v);
                let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                data.push((name.clone(), vec![v.len()], safetensors::Dtype::F32, bytes));
            } else {
                data.push((
                    name.clone(),
                    view.shape().to_vec(),
                    view.dtype(),
                    view.data().to_vec(),
                ));
            }
        }
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
            .iter()
            .map(|(n, s, d, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
                )
            })
            .collect();
        std::fs::write(&out, safetensors::tensor::serialize(views, &None).unwrap()).unwrap();
        out
    };
    let err = loaded
        .load_timm(tamper("blocks.2.mlp.fc1.v", &|v| {
            v.pop();
        }))
        .unwrap_err()
        .to_string();
    assert!(err.contains("blocks.2.mlp.fc1.v"), "{err}");
    let err = loaded
        .load_timm(tamper("fips.block_group", &|v| v[1] = 5.0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("fips.block_group[1] = 5"), "{err}");
    assert_eq!(loaded.mlp.layers[2].v1.as_vec(), before);

    // A dense checkpoint is not a FiPS one: its plan says so (a file without a plan would be
    // refused by the missing key `fips.bases`).
    let err = loaded.load_timm(&dense_path).unwrap_err().to_string();
    assert!(
        err.contains("with fips = none, but TinyFips has fips = groups [[0, 1], [2, 3]]"),
        "{err}"
    );
}

#[test]
fn the_pipeline_runs_from_a_checkpoint_and_reports_per_block_errors() {
    let dir = scratch("fips-run");
    let dev = Cpu::seed_from_u64(9);
    let dense = dev.build_module::<Tiny, f32>();
    let ckpt = dir.join("dense.safetensors");
    dense.save_timm(&ckpt).unwrap();
    let images: Tensor<(usize, usize, usize, usize), f32, Cpu> = dev.sample_normal_like(&(8, 3, 8, 8));
    let images = images.as_vec();
    let job = fips::FipsJob {
        checkpoint: &ckpt,
        groups: None,
        group_size: 2,
        budget: 0.5,
        sparsity: 0.5,
        calib: &images,
        calib_n: 8,
        recon: ReconConfig {
            steps: 40,
            lr: 3e-3,
            rows: 40,
            ..Default::default()
        },
    };
    let runner = <Tiny as fips::FipsCompress>::RUNNER.expect("a dense ViT can be compressed");
    let out = runner(&job, &mut |_, _| {}).unwrap();
    let r = &out.report;
    assert_eq!(r.plan.groups, groups());
    assert_eq!(
        (r.plan.rank, r.init_errors.len(), r.final_errors.len()),
        (14, 4, 4)
    );
    assert_eq!(
        r.fips_mlp_params + Tiny::PARAMS - r.dense_mlp_params,
        TinyFips::PARAMS
    );
    assert_eq!(out.model.info().params, TinyFips::PARAMS);
    assert!(r.final_errors.iter().sum::<f64>() < r.init_errors.iter().sum::<f64>());
    // The result is a TinyFips checkpoint.
    let path = dir.join("fips.safetensors");
    out.model.save_timm(&path, Default::default()).unwrap();
    let mut declared = dev.build_module::<TinyFips, f32>();
    declared.load_timm(&path).unwrap();
    let logits = out.model.predict(&images[..3 * 64], 1);
    let x = dev.tensor_from_vec(images[..3 * 64].to_vec(), (1, 3, 8, 8));
    assert!(rel_err(&f64s(declared.logits(x).as_vec()), &f64s(logits)) < 1e-6);
    // Bad plans are refused with the reason.
    let err = runner(
        &fips::FipsJob {
            group_size: 3,
            ..job.clone()
        },
        &mut |_, _| {},
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("does not divide"), "{err}");
    // A FiPS model is not compressed again.
    assert!(<TinyFips as fips::FipsCompress>::RUNNER.is_none());
}
