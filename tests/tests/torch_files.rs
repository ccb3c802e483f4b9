//! PyTorch checkpoint files, written by the real `torch.save` (`scripts/make_torch_fixtures.py`),
//! load into the model exactly as the same weights in safetensors do, in every nesting and dtype
//! checkpoints come in; files spin cannot use are refused in one line naming the file.
use spin_core::checkpoint::TimmCheckpoint;
use spin_core::models::SpinModel;
use spin_core::prelude::*;
use spin_tests::{fixture, rel_err, tensor};

#[convmixer(dim = 32, kernel = 5, patch = 2, image = 16, classes = 10, act = gelu, depth = 4)]
struct SmallMixer;

// The ConvMixer `scripts/make_mlspin_fixtures.py` writes in ml-spin's layout, and its shared form.
#[convmixer(dim = 16, kernel = 3, patch = 2, image = 16, classes = 5, act = gelu, variant = spin, depth = 4)]
struct MlSpinMixer;
#[convmixer(dim = 16, kernel = 3, patch = 2, image = 16, classes = 5, act = gelu, variant = spin)]
#[shared_blocks(depth = 4, groups = 2, pattern = sequential)]
struct MlSpinShared;

fn logits(m: &<SmallMixer as BuildOnDevice<Cpu, f32>>::Built) -> Vec<f64> {
    let dev = Cpu::default();
    let (_, x) = tensor("convmixer_small_io.safetensors", "input");
    let x = dev.tensor_from_vec(
        x.iter().map(|&v| v as f32).collect::<Vec<_>>(),
        (Const::<3>, Const::<3>, Const::<16>, Const::<16>),
    );
    m.forward(x).as_vec().into_iter().map(|v| v as f64).collect()
}

fn torch_file(name: &str) -> std::path::PathBuf {
    fixture("torch").join(name)
}

#[test]
fn every_nesting_and_dtype_loads_the_same_weights() {
    let dev = Cpu::default();
    let mut reference = dev.build_module::<SmallMixer, f32>();
    reference
        .load_timm(fixture("convmixer_small.safetensors"))
        .unwrap();
    let want = logits(&reference);
    let (_, timm) = tensor("convmixer_small_io.safetensors", "logits");
    assert!(rel_err(&want, &timm) < 1e-5);
    // (file, nested under, stored dtype, tolerance against the f32 weights' logits)
    let cases: &[(&str, Option<&str>, &str, f64)] = &[
        ("top.pth", None, "f32", 0.0),
        ("slowfast.pyth", Some("model_state"), "f32", 0.0),
        ("state_dict.pt", Some("state_dict"), "f32", 0.0),
        ("model.bin", Some("model"), "f32", 0.0),
        ("model_ema.pth", Some("model_ema"), "f32", 0.0),
        ("legacy.pth", None, "f32", 0.0),
        ("f64.pth", None, "f64", 0.0),
        // Rounding every weight to 11 or 8 significant bits moves the logits by about that much.
        ("f16.pth", None, "f16", 5e-3),
        ("bf16.pth", None, "bf16", 4e-2),
    ];
    for &(name, nested, dtype, tol) in cases {
        let mut m = dev.build_module::<SmallMixer, f32>();
        let report = m
            .load_checkpoint(torch_file(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(report.format, "pytorch");
        let torch = report.torch.unwrap();
        assert_eq!(torch.nested_under.as_deref(), nested, "{name}");
        assert_eq!(torch.dtypes.keys().collect::<Vec<_>>(), vec![dtype], "{name}");
        // The nine BatchNorms' step counters are integers: skipped, and said so.
        assert_eq!(torch.skipped.len(), 9, "{name}: {:?}", torch.skipped);
        assert!(torch.skipped.iter().all(|k| k.ends_with("num_batches_tracked")));
        let err = rel_err(&logits(&m), &want);
        assert!(err <= tol, "{name}: {err:e} > {tol:e}");
    }
}

#[test]
fn files_spin_cannot_use_are_refused_naming_the_file() {
    let dev = Cpu::default();
    let cases = [
        ("quantized.pth", "not a readable PyTorch checkpoint"),
        ("truncated.pth", "not a readable PyTorch checkpoint"),
        ("no_pickle.pth", "not a readable PyTorch checkpoint"),
        ("other_model.pth", "stem.0.weight"),
    ];
    for (name, says) in cases {
        let mut m = dev.build_module::<SmallMixer, f32>();
        let err = m.load_timm(torch_file(name)).unwrap_err().to_string();
        assert!(
            err.contains(name) && err.contains(says) && !err.contains('\n'),
            "{name}: {err}"
        );
    }
}

#[test]
fn spin_import_converts_and_names_what_it_read() {
    use clap::Parser;
    let dir = spin_tests::scratch("import");
    let run = |args: &[&str]| {
        let cli = zoo::cli::Cli::try_parse_from(std::iter::once("spin").chain(args.iter().copied())).unwrap();
        let mut out = Vec::new();
        zoo::cli::run(cli, &mut out).map(|()| String::from_utf8(out).unwrap())
    };
    // A member's own checkpoint, through a PyTorch-shaped detour: spin writes it, imports it back.
    let member = "digits_convmixer_64_8_ws4_strided";
    let first = dir.join("first.safetensors");
    zoo::build(member, 3)
        .unwrap()
        .save_timm(&first, spin_core::checkpoint::StorageDtype::F32)
        .unwrap();
    let second = dir.join("second.safetensors");
    let out = run(&[
        "import",
        "--from",
        &first.display().to_string(),
        "--model",
        member,
        "--out",
        &second.display().to_string(),
    ])
    .unwrap();
    assert!(out.contains("safetensors") && out.contains("wrote"), "{out}");
    assert_eq!(std::fs::read(&first).unwrap(), std::fs::read(&second).unwrap());
    // A PyTorch file of another model: refused, naming the file and the tensor.
    let err = run(&[
        "import",
        "--from",
        &torch_file("top.pth").display().to_string(),
        "--model",
        member,
        "--out",
        &dir.join("x.safetensors").display().to_string(),
    ])
    .unwrap_err()
    .to_string();
    assert!(err.contains("top.pth") && err.contains("stem.0.weight"), "{err}");
}

fn ml_spin_logits<M: SpinModel<f32, Cpu>>(m: &M, case: &str) -> (Vec<f64>, Vec<f64>) {
    let dev = Cpu::default();
    let io = format!("mlspin/{case}_io.safetensors");
    let (shape, x) = tensor(&io, "input");
    let x = dev.tensor_from_vec(
        x.iter().map(|&v| v as f32).collect::<Vec<_>>(),
        (shape[0], 3, 16, 16),
    );
    let got = m.logits(x).as_vec().into_iter().map(|v| v as f64).collect();
    (got, tensor(&io, "logits").1)
}

#[test]
fn ml_spin_checkpoints_load_and_match_its_logits() {
    use spin_core::checkpoint::Layout;
    let dev = Cpu::default();
    let file = |case: &str| fixture("mlspin").join(format!("{case}.pyth"));
    // (file, into the shared model?)
    for (case, shared) in [("unshared", false), ("shared", true), ("fused", true)] {
        let (got, want) = if shared {
            let mut m = dev.build_module::<MlSpinShared, f32>();
            let report = m
                .load_checkpoint(file(case))
                .unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_eq!(report.layout, Layout::MlSpin);
            assert_eq!(report.torch.unwrap().nested_under.as_deref(), Some("model_state"));
            ml_spin_logits(&m, case)
        } else {
            let mut m = dev.build_module::<MlSpinMixer, f32>();
            m.load_checkpoint(file(case))
                .unwrap_or_else(|e| panic!("{case}: {e}"));
            ml_spin_logits(&m, case)
        };
        let err = rel_err(&got, &want);
        assert!(err < 1e-5, "{case} (shared model: {shared}): {err:e}");
    }
    // ml-spin's files do not record their mapping: a shared one needs the member with its groups.
    let mut m = dev.build_module::<MlSpinMixer, f32>();
    let err = m.load_timm(file("shared")).unwrap_err().to_string();
    assert!(
        err.contains("shared.pyth") && err.contains("2 pointwise convs"),
        "{err}"
    );
    // Four different pointwise convs do not fit two groups: the tied copies differ.
    let mut m = dev.build_module::<MlSpinShared, f32>();
    let err = m.load_timm(file("unshared")).unwrap_err().to_string();
    assert!(
        err.contains("unshared.pyth") && err.contains("blocks.0.1.weight"),
        "{err}"
    );
}
