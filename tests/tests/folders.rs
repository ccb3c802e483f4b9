//! ImageFolder data as users have it — `train/` and `val/`, non-square images in mixed formats —
//! trains with augmentation through the streaming loader, and a trained member fine-tunes to
//! another class count.
use spin_core::checkpoint::read_tensors;
use spin_core::train::load_all_but_head;
use spin_tests::scratch;
use std::path::Path;
use zoo::cli::{self, Cli};

fn run(args: &[&str]) -> Result<String, spin_core::Error> {
    use clap::Parser;
    let cli = Cli::try_parse_from(std::iter::once("spin").chain(args.iter().copied())).unwrap();
    let mut out = Vec::new();
    cli::run(cli, &mut out)?;
    Ok(String::from_utf8(out).unwrap())
}

/// `per_class` images per class, each of another size and format: RGB PNG, JPEG, BMP, grey PNG,
/// RGBA PNG and 16-bit PNG in turn. Class c is a bright band at height c.
fn write_split(dir: &Path, classes: usize, per_class: usize) {
    for c in 0..classes {
        let d = dir.join(format!("c{c}"));
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..per_class {
            let (w, h) = (20 + 7 * i as u32, 14 + 5 * (i as u32 % 3));
            let img = image::RgbImage::from_fn(w, h, |x, y| {
                let band = y * classes as u32 / h == c as u32;
                let v = if band { 230 } else { 30 + (x % 7) as u8 * 5 };
                image::Rgb([v, v, v / 2])
            });
            let img = image::DynamicImage::ImageRgb8(img);
            let (img, ext) = match i % 6 {
                0 => (img, "png"),
                1 => (img, "jpg"),
                2 => (img, "bmp"),
                3 => (image::DynamicImage::ImageLuma8(img.to_luma8()), "png"),
                4 => (image::DynamicImage::ImageRgba8(img.to_rgba8()), "png"),
                _ => (image::DynamicImage::ImageRgb16(img.to_rgb16()), "png"),
            };
            img.save(d.join(format!("{i}.{ext}"))).unwrap();
        }
    }
}

#[test]
fn mixed_image_folders_train_with_augmentation_and_fine_tune_to_their_class_count() {
    let dir = scratch("folders-finetune");
    write_split(&dir.join("data/train"), 3, 12);
    write_split(&dir.join("data/val"), 3, 4);
    let data = format!("folder:{}", dir.join("data").display());
    let pre = dir.join("pre");
    // A 10-class member trained on the 3 classes, with every augmentation on.
    let out = run(&[
        "train",
        "--model",
        "digits_convmixer_64_8",
        "--data",
        &data,
        "--epochs",
        "2",
        "--warmup-epochs",
        "1",
        "--schedule",
        "cosine",
        "--rand-ops",
        "2",
        "--mixup",
        "0.4",
        "--cutmix",
        "1",
        "--batch",
        "8",
        "--workers",
        "2",
        "--out",
        &pre.display().to_string(),
        "--quiet",
    ])
    .unwrap();
    assert!(out.contains("36 train / 12 test images"), "{out}");
    assert!(
        out.contains("augment rrc0.25+flip+rand-n2-m9+mixup0.4+cutmix1")
            && out.contains("(cosine, 1 warm-up epochs)"),
        "{out}"
    );
    assert!(out.contains("epoch   2:"), "{out}");
    // The settings are recorded: resuming with another augmentation is refused.
    let err = run(&[
        "train",
        "--model",
        "digits_convmixer_64_8",
        "--data",
        &data,
        "--epochs",
        "3",
        "--out",
        &pre.display().to_string(),
        "--resume",
        "--quiet",
    ])
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("started with --augment rrc0.25+flip+rand-n2"),
        "{err}"
    );

    // Fine-tuning: the member is found from the checkpoint's plan and the class count.
    let ckpt = pre.join("checkpoint.safetensors");
    let out = run(&[
        "train",
        "--init-from",
        &ckpt.display().to_string(),
        "--num-classes",
        "3",
        "--data",
        &data,
        "--epochs",
        "1",
        "--batch",
        "8",
        "--out",
        &dir.join("ft").display().to_string(),
        "--quiet",
    ])
    .unwrap();
    assert!(out.starts_with("digits_convmixer_64_8_c3:"), "{out}");
    assert!(out.contains("epoch   1:"), "{out}");
    // No member with that count: the error says what to declare.
    let err = run(&[
        "train",
        "--init-from",
        &ckpt.display().to_string(),
        "--num-classes",
        "4",
        "--data",
        &data,
        "--out",
        &dir.join("ft4").display().to_string(),
    ])
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("no zoo member is digits_convmixer_64_8 with 4 classes") && err.contains("classes = 4"),
        "{err}"
    );
    // A member of another architecture is refused, naming the field.
    let err = run(&[
        "train",
        "--model",
        "digits_vit_64_6",
        "--init-from",
        &ckpt.display().to_string(),
        "--num-classes",
        "10",
        "--data",
        &data,
    ])
    .unwrap_err()
    .to_string();
    assert!(err.contains("family"), "{err}");

    // Everything but the head is the checkpoint's; the head keeps its fresh initialisation.
    let member = zoo::find("digits_convmixer_64_8_c3").unwrap();
    let fresh = (member.build)(5).state_tensors();
    let mut model = (member.build)(5);
    let loaded = load_all_but_head(model.as_mut(), &ckpt).unwrap();
    let file = read_tensors(&ckpt, &std::fs::read(&ckpt).unwrap()).unwrap();
    let now = model.state_tensors();
    assert_eq!(loaded, file.len() - 2);
    for (key, value) in &now {
        if key.starts_with("head.") {
            assert_eq!(value, &fresh[key], "{key}");
        } else {
            assert_eq!(value.1, file[key].1, "{key}");
        }
    }
    assert_eq!(now["head.weight"].0, vec![3, 64]);
}

#[test]
fn schedule_and_augmentation_options_are_checked() {
    let err = run(&[
        "train",
        "--model",
        "digits_convmixer_64_8",
        "--epochs",
        "2",
        "--warmup-epochs",
        "2",
    ])
    .unwrap_err()
    .to_string();
    assert!(err.contains("--warmup-epochs 2 leaves no epoch"), "{err}");
}
