//! spin's eval transform gives the tensor timm's does for the same file: the images and tensors
//! come from `scripts/make_transform_fixtures.py` (timm's `create_transform`, PIL underneath).
//!
//! For lossless files (grey, RGBA and 16-bit PNG, palette GIF) the resize is PIL's to the bit,
//! PIL's conversion quirks included (16-bit grey clipped, 16-bit colour truncated). A JPEG's
//! inverse DCT rounds otherwise than libjpeg's (up to 3 steps on single raw pixels, same chroma
//! upsampling); after the resize it stays within one step, CMYK ones too.
use spin_core::data::{decode, eval_pixels, pil_rgb, DataConfig};
use spin_tests::{fixture, tensor};

/// timm's eval configs the fixtures were made with: DeiT's crop, SPIN's, and the two other crop
/// modes (the border one pads with ImageNet's mean colour).
fn configs() -> Vec<(&'static str, DataConfig)> {
    let with = |image, crop_pct, mode: &str, interpolation: &str, mean| DataConfig {
        crop_mode: mode.into(),
        interpolation: interpolation.into(),
        mean,
        ..DataConfig::imagenet(image, crop_pct)
    };
    vec![
        ("deit", with(48, 0.9, "center", "bicubic", [0.0; 3])),
        ("spin", with(40, 1.0, "center", "bicubic", [0.0; 3])),
        ("squash", with(36, 0.875, "squash", "bilinear", [0.0; 3])),
        (
            "border",
            with(44, 0.95, "border", "bicubic", DataConfig::IMAGENET_MEAN),
        ),
    ]
}

#[test]
fn eval_tensors_match_timms() {
    // (file, largest difference allowed in 8-bit steps)
    let files = [
        ("colour.jpg", 1.0),
        ("cmyk.jpg", 1.0),
        ("grey.png", 0.0),
        ("grey16.png", 0.0),
        ("rgb16.png", 0.0),
        ("rgba.png", 0.0),
        ("palette.gif", 0.0),
    ];
    for (cfg_name, cfg) in configs() {
        for (file, steps) in files {
            let img = decode(&fixture("images").join(file)).unwrap();
            let ours = eval_pixels(&pil_rgb(&img), &cfg);
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
    // squash: both sides to 248, whatever the aspect ratio.
    let squash = DataConfig {
        crop_mode: "squash".into(),
        ..deit.clone()
    };
    assert_eq!(eval_geometry(300, 200, &squash), ((248, 248), (12, 12)));
    // border: the long side to 248, the short one 248·200/300 = 165.33 → 165; the crop pads
    // (224 − 165) / 2 = 29 rows above (rounded down), and takes 12 columns off the left.
    let border = DataConfig {
        crop_mode: "border".into(),
        ..deit
    };
    assert_eq!(eval_geometry(300, 200, &border), ((248, 165), (12, -29)));
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

#[spin_core::prelude::vit(dim = 32, heads = 4, patch = 4, image = 16, classes = 10, depth = 3)]
struct SmallVit;

#[test]
fn predictions_on_the_photos_are_timms() {
    use spin_core::data::preprocess;
    use spin_core::prelude::*;
    // The parity fixture ViT (seeded weights) as a 16-px DeiT-style member: its data config is
    // DeiT's (crop 0.9, bicubic, ImageNet statistics), which is what the fixtures used with timm.
    let dev = Cpu::default();
    let mut m = dev.build_module::<SmallVit, f32>();
    m.load_timm(fixture("vit_small.safetensors")).unwrap();
    let cfg = DataConfig::for_model(&SmallVit::info());
    assert_eq!((cfg.crop_pct, cfg.interpolation.as_str()), (0.9, "bicubic"));
    let rank = |p: &[f64]| {
        let mut order: Vec<usize> = (0..p.len()).collect();
        order.sort_by(|a, b| p[*b].total_cmp(&p[*a]));
        order.truncate(5);
        order
    };
    for file in [
        "colour.jpg",
        "cmyk.jpg",
        "grey.png",
        "grey16.png",
        "rgb16.png",
        "rgba.png",
        "palette.gif",
    ] {
        let img = decode(&fixture("images").join(file)).unwrap();
        let x: Tensor<Rank3<3, 16, 16>, f32, _> = dev.tensor(preprocess(&img, &cfg));
        let logits: Vec<f64> = m.forward(x).as_vec().into_iter().map(f64::from).collect();
        let z: f64 = logits.iter().map(|l| l.exp()).sum();
        let ours: Vec<f64> = logits.iter().map(|l| l.exp() / z).collect();
        let (_, want) = tensor("images/timm_eval.safetensors", &format!("predict/{file}"));
        // Same top-5 classes in the same order, every probability within 0.2 points.
        assert_eq!(rank(&ours), rank(&want), "{file}");
        let worst = ours
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            worst < 0.002,
            "{file}: probabilities differ by {:.3} points",
            worst * 100.0
        );
    }
}
