//! The `spin` command end to end on small data the tests write: zoo listing, train (checkpoints,
//! metrics, resume, divergence), eval, predict, compare, and the CIFAR-10 and folder readers.
use spin_core::data::{self, DataConfig, DataSpec};
use spin_core::Error;
use spin_tests::scratch;
use std::path::{Path, PathBuf};
use zoo::cli::{self, Cli, Cmd, ZooArgs};
use zoo::report::Format;

fn parse(args: &[&str]) -> Cli {
    use clap::Parser;
    Cli::try_parse_from(std::iter::once("spin").chain(args.iter().copied())).unwrap()
}

fn run(args: &[&str]) -> Result<String, Error> {
    let mut out = Vec::new();
    cli::run(parse(args), &mut out)?;
    Ok(String::from_utf8(out).unwrap())
}

/// CIFAR-10 binary batches with `per_batch` random records each (labels 0..9).
fn write_cifar(dir: &Path, per_batch: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut state = 7u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as u8
    };
    for name in [
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
    ] {
        let mut bytes = Vec::new();
        for i in 0..per_batch {
            let label = (i % 10) as u8;
            bytes.push(label);
            // Class-dependent brightness so the data is learnable.
            bytes.extend((0..3072).map(|_| label * 20 + next() % 40));
        }
        std::fs::write(dir.join(format!("{name}.bin")), bytes).unwrap();
    }
}

/// A folder data set: `classes` sub-directories of small PNGs.
fn write_folder(dir: &Path, classes: usize, per_class: usize) {
    for c in 0..classes {
        let d = dir.join(format!("class_{c}"));
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..per_class {
            let img = image::RgbImage::from_fn(12, 10, |x, y| {
                let v = (c as u32 * 90 + (x + y + i as u32) % 30) as u8;
                image::Rgb([v, v / 2, 255 - v])
            });
            img.save(d.join(format!("{i}.png"))).unwrap();
        }
    }
}

#[test]
fn zoo_lists_every_member_with_params_equal_to_the_type_consts() {
    let mut out = Vec::new();
    cli::zoo(
        &ZooArgs {
            filter: None,
            format: Format::Csv,
            wide: false,
        },
        &mut out,
    )
    .unwrap();
    let text = String::from_utf8(out).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next().unwrap(),
        "name,family,params,macs,depth,groups,pattern,share,compression,size_f32_mb,size_f16_mb,\
         input,crop_pct,crop_mode,interpolation"
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), zoo::MEMBERS.len());
    let params = |name: &str| {
        rows.iter().find(|r| r[0] == name).unwrap()[2]
            .parse::<usize>()
            .unwrap()
    };
    assert_eq!(params("convmixer_768_32"), zoo::convmixer_768_32::PARAMS);
    // Each family's eval transform is timm's: DeiT crops 0.9, timm's ConvMixers 0.96.
    let eval = |name: &str| rows.iter().find(|r| r[0] == name).unwrap()[11..].join(",");
    assert_eq!(eval("deit_tiny_patch16_224"), "224,0.9,center,bicubic");
    assert_eq!(eval("convmixer_768_32"), "224,0.96,center,bicubic");
    assert_eq!(
        params("convmixer_768_32_ws4_sequential"),
        zoo::convmixer_768_32_ws4_sequential::PARAMS
    );
    assert_eq!(
        params("deit_small_patch16_224_ws2_strided"),
        zoo::deit_small_patch16_224_ws2_strided::PARAMS
    );
    assert_eq!(
        params("deit_base_patch16_224_ws12_all"),
        zoo::deit_base_patch16_224_ws12_all::PARAMS
    );
    // FiPS's DeiT-B example: rank 1365, and the MLPs at half their parameters (plus biases).
    assert_eq!(zoo::deit_base_patch16_224_fips::RANK, 1365);
    assert_eq!(
        params("deit_base_patch16_224_fips"),
        zoo::deit_base_patch16_224_fips::PARAMS
    );
    let dense_mlp = 12 * spin_core::rules::counts::mlp_params(768, 3072);
    let saved = zoo::deit_base_patch16_224::PARAMS - zoo::deit_base_patch16_224_fips::PARAMS;
    assert!((saved as f64 / dense_mlp as f64 - 0.5).abs() < 0.01, "{saved}");
    // Built at run time by name, the small members count the same parameters.
    for name in zoo::DIGITS_COMPARISON {
        assert_eq!(zoo::build(name, 0).unwrap().num_params(), params(name), "{name}");
    }
    for m in zoo::MEMBERS {
        let i = (m.info)();
        assert!(
            i.name.contains("_ws") != ["none", "fips"].contains(&i.share),
            "{}",
            i.name
        );
        assert!(i.name.ends_with("_fips") == (i.share == "fips"), "{}", i.name);
    }
    // The other formats carry the same members.
    let json = run(&["zoo", "--format", "json"]).unwrap();
    assert_eq!(json.matches("\"name\"").count(), zoo::MEMBERS.len());
    let md = run(&["zoo", "--format", "markdown"]).unwrap();
    assert!(md.contains("| convmixer_1536_20_ws2_sequential "));
    assert!(zoo::build("convmixer_9999", 0).is_err());
}

#[test]
fn train_writes_checkpoints_and_metrics_and_resumes_bit_for_bit() {
    let dir = scratch("train-resume");
    let cifar = dir.join("cifar");
    write_cifar(&cifar, 12);
    let data = format!("cifar10:{}", cifar.display());
    let common = [
        "--model",
        "digits_convmixer_64_8_ws4_strided",
        "--data",
        &data,
        "--batch",
        "16",
        "--quiet",
    ];
    let full = dir.join("full");
    let mut args: Vec<&str> = vec!["train"];
    args.extend(common);
    let full_s = full.display().to_string();
    let mut a = args.clone();
    a.extend(["--epochs", "2", "--out", &full_s]);
    let log = run(&a).unwrap();
    assert!(log.contains("epoch   2:"), "{log}");
    let metrics = std::fs::read_to_string(full.join("metrics.csv")).unwrap();
    assert_eq!(metrics.lines().count(), 3, "{metrics}");
    assert!(metrics.starts_with("epoch,lr_peak,train_loss,train_accuracy,test_loss,test_accuracy"));

    // A two-epoch run stopped after one epoch, then resumed: the same weights and optimiser
    // state as the uninterrupted run, bit for bit.
    let split = dir.join("split");
    let split_s = split.display().to_string();
    let mut a = args.clone();
    a.extend(["--epochs", "2", "--stop-after", "1", "--out", &split_s]);
    run(&a).unwrap();
    let mut a = args.clone();
    a.extend(["--epochs", "2", "--out", &split_s, "--resume"]);
    run(&a).unwrap();
    let read = |p: PathBuf| std::fs::read(p).unwrap();
    assert!(
        read(full.join("checkpoint.safetensors")) == read(split.join("checkpoint.safetensors")),
        "weights differ"
    );
    let opt = |d: &Path| spin_core::train::RunState::load(d).unwrap().optimizer;
    assert!(opt(&full) == opt(&split), "optimiser state differs");
    assert_eq!(opt(&full).t, 2 * 4); // 2 epochs of ceil(60 / 16) steps
    assert_eq!(
        std::fs::read_to_string(split.join("metrics.csv"))
            .unwrap()
            .lines()
            .count(),
        3
    );

    // A run that diverges stops with a message and leaves the last good checkpoint in place.
    let before = read(split.join("checkpoint.safetensors"));
    let mut a = args.clone();
    a.extend([
        "--epochs",
        "3",
        "--out",
        &split_s,
        "--resume",
        "--lr",
        "1e30",
        "--clip",
        "0",
        "--override",
    ]);
    let err = run(&a).unwrap_err().to_string();
    assert!(
        err.contains("diverged") && err.contains("last good checkpoint"),
        "{err}"
    );
    assert!(
        before == read(split.join("checkpoint.safetensors")),
        "the last good checkpoint changed"
    );
    // No temporary files are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&split)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty());

    // eval and predict read the checkpoint back.
    let ckpt = split.join("checkpoint.safetensors").display().to_string();
    let out = run(&[
        "eval",
        "--model",
        "digits_convmixer_64_8_ws4_strided",
        "--weights",
        &ckpt,
        "--data",
        &data,
    ])
    .unwrap();
    assert!(out.contains("test accuracy"), "{out}");
    let png = dir.join("x.png");
    image::RgbImage::from_pixel(20, 16, image::Rgb([120, 60, 200]))
        .save(&png)
        .unwrap();
    let png_s = png.display().to_string();
    let out = run(&[
        "predict",
        "--model",
        "digits_convmixer_64_8_ws4_strided",
        "--weights",
        &ckpt,
        &png_s,
    ])
    .unwrap();
    assert!(
        out.starts_with(&png_s) && out.contains("class ") && out.contains('%'),
        "{out}"
    );
    // A directory is its image files, sorted; --json prints one object per image.
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    for name in ["b.png", "a.bmp"] {
        image::RgbImage::from_pixel(12, 9, image::Rgb([10, 200, 30]))
            .save(images.join(name))
            .unwrap();
    }
    std::fs::write(images.join("notes.txt"), "not an image").unwrap();
    let out = run(&[
        "predict",
        "--weights",
        &ckpt,
        "--json",
        "--top",
        "2",
        &images.display().to_string(),
    ])
    .unwrap();
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0]["image"].as_str().unwrap().ends_with("a.bmp"));
    assert_eq!(lines[1]["names"].as_array().unwrap().len(), 2);
    let p = lines[1]["probabilities"].as_array().unwrap();
    assert!(p[0].as_f64().unwrap() >= p[1].as_f64().unwrap());
    // A file that is not an image is named in the error.
    let bad = dir.join("bad.png");
    std::fs::write(&bad, b"not a png").unwrap();
    let err = run(&[
        "predict",
        "--model",
        "digits_convmixer_64_8_ws4_strided",
        "--weights",
        &ckpt,
        &bad.display().to_string(),
    ])
    .unwrap_err();
    assert!(matches!(err, Error::Image { .. }), "{err}");
    // A shared checkpoint is an ordinary timm checkpoint: the unshared model loads its tied copies.
    assert!(run(&["eval", "--model", "digits_convmixer_64_8", "--weights", &ckpt]).is_ok());
    // A model that ties layers the checkpoint keeps apart refuses it, naming the field of the
    // plan the checkpoint carries (a file without a plan is refused by the copies that differ,
    // tests/tests/sharing.rs).
    let err = run(&[
        "eval",
        "--model",
        "digits_convmixer_64_8_ws2_sequential",
        "--weights",
        &ckpt,
    ])
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("schedule = [0, 0, 1, 1, 2, 2, 3, 3]") && err.contains("ws4_strided"),
        "{err}"
    );
}

#[test]
fn compare_trains_members_and_writes_table_csv_and_plots() {
    let dir = scratch("compare");
    let cifar = dir.join("cifar");
    write_cifar(&cifar, 8);
    let out_dir = dir.join("out");
    let out = run(&[
        "compare",
        "--models",
        "digits_convmixer_64_8_ws4_strided,digits_vit_64_6_ws6_all",
        "--data",
        &format!("cifar10:{}", cifar.display()),
        "--epochs",
        "1",
        "--out",
        &out_dir.display().to_string(),
        "--quiet",
    ])
    .unwrap();
    assert!(out.contains("| digits_vit_64_6_ws6_all"), "{out}");
    let csv = std::fs::read_to_string(out_dir.join("compare.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3);
    assert!(csv.starts_with("name,family,params,macs,depth,groups,share,test_accuracy"));
    let png = image::open(out_dir.join("compare.png")).unwrap();
    assert_eq!((png.width(), png.height()), (1200, 520));
    let svg = std::fs::read_to_string(out_dir.join("compare.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("parameters"));
}

#[test]
fn cifar10_reader_checks_every_batch() {
    let dir = scratch("cifar-reader");
    write_cifar(&dir, 5);
    let cfg = DataConfig::centred(8);
    let s = data::load(&DataSpec::Cifar10(dir.clone()), &cfg).unwrap();
    assert_eq!((s.train.len(), s.test.len()), (25, 5));
    assert_eq!(s.train.gather(&[0, 1, 2]).unwrap().0.len(), 3 * 3 * 64);
    assert_eq!(s.train.labels[..3], [0, 1, 2]);
    // A truncated batch.
    let b3 = dir.join("data_batch_3.bin");
    let bytes = std::fs::read(&b3).unwrap();
    std::fs::write(&b3, &bytes[..bytes.len() - 100]).unwrap();
    let err = data::load(&DataSpec::Cifar10(dir.clone()), &cfg)
        .unwrap_err()
        .to_string();
    assert!(err.contains("data_batch_3.bin") && err.contains("3073"), "{err}");
    // A missing batch.
    std::fs::remove_file(&b3).unwrap();
    let err = data::load(&DataSpec::Cifar10(dir), &cfg).unwrap_err();
    assert!(
        matches!(&err, Error::Io { path, .. } if path.ends_with("data_batch_3.bin")),
        "{err}"
    );
}

#[test]
fn folder_reader_uses_one_directory_per_class() {
    let dir = scratch("folder-reader");
    write_folder(&dir, 3, 5);
    let cfg = DataConfig::centred(8);
    let s = data::load(&DataSpec::Folder(dir.clone()), &cfg).unwrap();
    assert_eq!(s.train.len() + s.test.len(), 15);
    assert_eq!(s.train.classes, 3);
    assert_eq!(s.train.class_names, ["class_0", "class_1", "class_2"]);
    // An undecodable image and a file that is no image are skipped and listed; with `strict`
    // the undecodable one is named in the error.
    std::fs::write(dir.join("class_1").join("broken.png"), b"\x89PNG garbage").unwrap();
    std::fs::write(dir.join("class_1").join("notes.txt"), b"not an image").unwrap();
    let s = data::load(&DataSpec::Folder(dir.clone()), &cfg).unwrap();
    assert_eq!(s.train.len() + s.test.len(), 15);
    assert_eq!(s.skipped.len(), 2, "{:?}", s.skipped);
    let err = data::load_with(&DataSpec::Folder(dir), &cfg, true).unwrap_err();
    assert!(
        matches!(&err, Error::Image { path, .. } if path.ends_with("broken.png")),
        "{err}"
    );
    let err = data::load(&DataSpec::Folder("/nonexistent/spin".into()), &cfg).unwrap_err();
    assert!(matches!(err, Error::Io { .. }));
}

#[test]
fn image_folders_with_train_and_val_mixed_formats_and_empty_classes() {
    let dir = scratch("image-folder");
    write_folder(&dir.join("train"), 3, 4);
    write_folder(&dir.join("val"), 3, 2);
    // Another format and a non-square size in one class.
    let img = image::RgbImage::from_fn(20, 9, |x, _| image::Rgb([x as u8 * 10, 0, 0]));
    img.save(dir.join("train/class_2/wide.bmp")).unwrap();
    let cfg = DataConfig::centred(8);
    let s = data::load(&DataSpec::Folder(dir.clone()), &cfg).unwrap();
    assert_eq!((s.train.len(), s.test.len()), (13, 6));
    assert_eq!(s.test.class_names, ["class_0", "class_1", "class_2"]);
    assert!(s.skipped.is_empty());
    // A class whose images sit in a sub-folder has none: the error names it.
    let nested = dir.join("val/class_3/more");
    std::fs::create_dir_all(&nested).unwrap();
    let img = image::RgbImage::from_fn(8, 8, |_, _| image::Rgb([1, 2, 3]));
    img.save(nested.join("0.png")).unwrap();
    let err = data::load(&DataSpec::Folder(dir.clone()), &cfg)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("class_3") && err.contains("no readable image"),
        "{err}"
    );
    std::fs::remove_dir_all(dir.join("val/class_3")).unwrap();
    // A val/ with other classes than train/ is refused.
    write_folder(&dir.join("val2"), 2, 1);
    std::fs::rename(dir.join("val"), dir.join("val_ok")).unwrap();
    std::fs::rename(dir.join("val2"), dir.join("val")).unwrap();
    let err = data::load(&DataSpec::Folder(dir.clone()), &cfg)
        .unwrap_err()
        .to_string();
    assert!(err.contains("different classes"), "{err}");
    // A folder with fewer classes than the member has outputs trains (with a warning on stderr).
    std::fs::remove_dir_all(dir.join("val")).unwrap();
    std::fs::rename(dir.join("val_ok"), dir.join("val")).unwrap();
    let data = format!("folder:{}", dir.display());
    let out = run(&[
        "train",
        "--model",
        "digits_vit_64_6",
        "--data",
        &data,
        "--epochs",
        "1",
        "--out",
        &dir.join("run").display().to_string(),
        "--quiet",
    ])
    .unwrap();
    assert!(out.contains("13 train / 6 test images"), "{out}");
}

#[test]
fn command_line_errors_are_one_line_and_typed() {
    assert!(matches!(parse(&["zoo"]).cmd, Cmd::Zoo(_)));
    let err = run(&["train", "--model", "nope_model", "--epochs", "1"])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no zoo member `nope_model`") && !err.contains('\n'),
        "{err}"
    );
    let err = run(&[
        "eval",
        "--model",
        "digits_vit_64_6",
        "--weights",
        "/nonexistent.safetensors",
    ])
    .unwrap_err();
    assert!(matches!(err, Error::Io { .. }));
    use clap::Parser;
    assert!(Cli::try_parse_from(["spin", "train", "--model", "x", "--data", "mnist"]).is_err());
}

#[test]
fn fips_compresses_a_digits_vit_into_the_declared_fips_member() {
    let dir = scratch("cli-fips");
    let dense = dir.join("dense.safetensors");
    zoo::build("digits_vit_64_6", 1)
        .unwrap()
        .save_timm(&dense, Default::default())
        .unwrap();
    let out = dir.join("fips.safetensors");
    let (d, o) = (dense.to_str().unwrap(), out.to_str().unwrap());
    let json = run(&[
        "fips",
        "--from",
        d,
        "--model",
        "digits_vit_64_6",
        "--budget",
        "0.5",
        "--sparsity",
        "0.5",
        "--calib-images",
        "32",
        "--steps",
        "20",
        "--rows",
        "64",
        "--finetune-epochs",
        "1",
        "--out",
        o,
        "--json",
    ])
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["rank"], 59);
    assert_eq!(v["groups"], serde_json::json!([[0, 1, 2], [3, 4, 5]]));
    assert_eq!(v["fips_params"], zoo::digits_vit_64_6_fips::PARAMS);
    assert_eq!(v["init_block_mse"].as_array().unwrap().len(), 6);
    assert!(v["finetuned_accuracy"].is_number());
    assert!(out.with_extension("png").exists());
    // The result loads into the member declared with the same plan.
    let eval = run(&["eval", "--model", "digits_vit_64_6_fips", "--weights", o]).unwrap();
    assert!(eval.contains("test accuracy"), "{eval}");
    // A result at a rank no declaration has (the defaults: sparsity 0.75, rank 109) evaluates
    // through the dense member and the FiPS member alike: the rank comes from the file.
    let other = dir.join("fips-default.safetensors");
    let other_s = other.to_str().unwrap();
    let json = run(&[
        "fips",
        "--from",
        d,
        "--model",
        "digits_vit_64_6",
        "--calib-images",
        "16",
        "--steps",
        "5",
        "--rows",
        "32",
        "--out",
        other_s,
        "--json",
    ])
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["rank"], 109);
    for model in ["digits_vit_64_6", "digits_vit_64_6_fips"] {
        let eval = run(&["eval", "--model", model, "--weights", other_s]).unwrap();
        assert!(eval.contains("test accuracy"), "{eval}");
    }
    // Only dense ViTs can be compressed.
    let err = run(&[
        "fips",
        "--from",
        d,
        "--model",
        "digits_convmixer_64_8",
        "--out",
        o,
    ])
    .unwrap_err()
    .to_string();
    assert!(err.contains("needs a dense ViT"), "{err}");
    let err = run(&[
        "fips",
        "--from",
        d,
        "--model",
        "digits_vit_64_6",
        "--groups",
        "0,1;2,x",
        "--out",
        o,
    ])
    .unwrap_err()
    .to_string();
    assert!(err.contains("`x` is not one"), "{err}");
}

/// `spin bench --train --profile`: one row per op the digits ViT's step runs, then the rest of
/// each pass and the whole pass, which holds every op's time (so the rest is not negative), in
/// the text table and in `--json`; `--profile` without `--train` is refused by name.
#[test]
fn bench_profile_splits_a_training_step_by_op() {
    let args = [
        "bench",
        "--model",
        "digits_vit_64_6",
        "--batch",
        "4",
        "--train",
        "--iters",
        "2",
        "--profile",
        "--threads",
        "1",
    ];
    let text = run(&args).unwrap();
    assert!(text.contains("digits_vit_64_6 batch 4 train f32 on "), "{text}");
    assert_eq!(
        [zoo::bench::threads_text(1), zoo::bench::threads_text(2)],
        ["1 thread", "2 threads"]
    );
    let ops = [
        "linear",
        "linear+gelu",
        "linear+residual",
        "layer norm",
        "attention core",
        "patchify",
    ];
    for op in ops
        .iter()
        .chain(&["rest (dfdx's own ops, the loss)", "whole pass", "optimizer"])
    {
        assert!(
            text.lines().any(|l| l.trim_start().starts_with(op)),
            "no `{op}` row in\n{text}"
        );
    }
    let json = run(&[&args[..], &["--json"]].concat()).unwrap();
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    let rows = v["profile"]["rows"].as_array().unwrap();
    let row = |name: &str| {
        rows.iter()
            .find(|r| r["op"] == name)
            .unwrap_or_else(|| panic!("{name}: {json}"))
    };
    let ms = |name: &str, pass: &str| row(name)[pass].as_f64().unwrap();
    for op in ops {
        assert!(
            ms(op, "forward_ms") > 0.0 && ms(op, "backward_ms") > 0.0,
            "{op}: {json}"
        );
    }
    // The digits ViT: 6 blocks of qkv, proj with its residual sum, fc1 with GELU and fc2 with its
    // residual sum; the patch embedding and the head.
    let calls = |name: &str| row(name)["calls"].as_f64();
    assert_eq!(
        [calls("linear"), calls("linear+gelu"), calls("linear+residual")],
        [Some(8.0), Some(6.0), Some(12.0)],
        "{json}"
    );
    let rest = "rest (dfdx's own ops, the loss)";
    assert!(
        ms(rest, "forward_ms") >= 0.0 && ms(rest, "backward_ms") >= 0.0,
        "{json}"
    );
    assert!(v["profile"]["optimizer_ms"].as_f64().unwrap() > 0.0, "{json}");
    use clap::Parser;
    let err = Cli::try_parse_from(["spin", "bench", "--model", "x", "--profile"]).unwrap_err();
    assert!(err.to_string().contains("--train"), "{err}");
}
