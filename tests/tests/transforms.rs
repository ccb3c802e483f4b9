//! spin's eval transform gives the tensor timm's does for the same file: the images and tensors
//! come from `scripts/make_transform_fixtures.py` (timm's `create_transform`, PIL underneath).
//!
//! For lossless files (grey and RGBA PNG, palette GIF) the resize is PIL's to the bit. A JPEG is
//! decoded differently (the image crate's decoder upsamples chroma otherwise than libjpeg, by up
//! to 7 steps on single raw pixels); after the resize it stays within 2 steps.
use spin_core::data::{decode, eval_pixels, DataConfig};
use spin_tests::{fixture, tensor};

#[test]
fn eval_tensors_match_timms() {
    let configs = [
        ("deit", DataConfig::imagenet(48, 0.9)),
        ("spin", DataConfig::imagenet(40, 1.0)),
    ];
    // (file, largest difference allowed in 8-bit steps)
    let files = [
        ("colour.jpg", 2.0),
        ("grey.png", 0.0),
        ("rgba.png", 0.0),
        ("palette.gif", 0.0),
    ];
    for (cfg_name, cfg) in configs {
        for (file, steps) in files {
            let img = decode(&fixture("images").join(file)).unwrap();
            let ours = eval_pixels(&img.to_rgb8(), &cfg);
            let (shape, want) = tensor("images/timm_eval.safetensors", &format!("{cfg_name}/{file}"));
            assert_eq!(shape, vec![3, cfg.image, cfg.image]);
            let mut worst = 0.0f64;
            for (x, y, p) in ours.enumerate_pixels() {
                for c in 0..3 {
                    let t = want[(c * cfg.image + y as usize) * cfg.image + x as usize];
                    worst = worst.max((f64::from(p.0[c]) - t * 255.0).abs());
                }
            }
            assert!(worst <= steps + 1e-3, "{cfg_name}/{file}: {worst:.2} steps");
        }
    }
}

#[test]
fn the_eval_geometry_is_torchvisions() {
    use spin_core::data::eval_geometry;
    // Resize the short side to ⌊224 / 0.9⌋ = 248, the long one truncated; crop offsets rounded
    // half to even (Python's round): (372 − 224) / 2 = 74, (249 − 224) / 2 = 12.5 → 12.
    let deit = DataConfig::imagenet(224, 0.9);
    assert_eq!(eval_geometry(300, 200, &deit), ((372, 248), (74, 12)));
    assert_eq!(eval_geometry(201, 200, &deit), ((249, 248), (12, 12)));
    assert_eq!(
        eval_geometry(200, 300, &DataConfig::imagenet(224, 1.0)),
        ((224, 336), (0, 56))
    );
}

#[test]
fn imagenet_validation_folders_map_class_folders_to_imagenet_indices() {
    use spin_core::data::{load, DataSpec};
    let dir = spin_tests::scratch("imagenet-val");
    for class in ["n01440764", "281", "n15075141"] {
        let d = dir.join(class);
        std::fs::create_dir_all(&d).unwrap();
        image::RgbImage::from_pixel(30, 20, image::Rgb([9, 99, 199]))
            .save(d.join("a.png"))
            .unwrap();
    }
    let cfg = DataConfig::imagenet(32, 0.9);
    let split = load(&DataSpec::ImageNet(dir.clone()), &cfg).unwrap();
    assert!(split.train.is_empty());
    assert_eq!(split.test.classes, 1000);
    // Folders are read in name order: 281, n01440764 (0), n15075141 (999).
    assert_eq!(split.test.labels, vec![281, 0, 999]);
    assert_eq!(split.test.class_names[281], "tabby, tabby cat");
    std::fs::create_dir_all(dir.join("cats")).unwrap();
    image::RgbImage::from_pixel(4, 4, image::Rgb([0, 0, 0]))
        .save(dir.join("cats/b.png"))
        .unwrap();
    let err = load(&DataSpec::ImageNet(dir), &cfg).unwrap_err().to_string();
    assert!(err.contains("cats") && err.contains("WordNet id"), "{err}");
}

#[test]
fn evaluation_reports_top_5() {
    use spin_core::data::{load, DataSpec};
    use spin_core::train::evaluate;
    // An untrained 10-class digits model: top-5 is at least top-1, and both are fractions.
    let split = load(&DataSpec::Digits, &DataConfig::centred(8)).unwrap();
    let model = zoo::build("digits_convmixer_64_8_ws4_strided", 1).unwrap();
    let s = evaluate(model.as_ref(), &split.test, 128).unwrap();
    assert!(s.top5 >= s.accuracy && s.top5 <= 1.0 && s.top5 > 0.0, "{s:?}");
}
