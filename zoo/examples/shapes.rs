//! Writes a small ImageFolder data set of three shapes — circles, squares and triangles of random
//! size, place and colour — as `DIR/train/<shape>/` and `DIR/val/<shape>/`, in mixed formats (PNG
//! in RGB, grey, RGBA and 16-bit; JPEG; BMP; GIF) and non-square sizes: data to try `folder:DIR`
//! training, augmentation and fine-tuning on without downloading anything.
//!
//! `cargo run --release -p zoo --example shapes -- DIR [TRAIN_PER_CLASS] [VAL_PER_CLASS]`
use image::{DynamicImage, Rgb, RgbImage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;

const SHAPES: [&str; 3] = ["circle", "square", "triangle"];

fn draw(shape: usize, rng: &mut StdRng) -> RgbImage {
    let (w, h) = (rng.gen_range(48..=320u32), rng.gen_range(48..=320u32));
    let bg = Rgb([rng.gen(), rng.gen(), rng.gen()]);
    // The shape's colour is far from the background's, so every image is separable.
    let fg = Rgb(bg.0.map(|c: u8| c.wrapping_add(128)));
    let side = w.min(h) as f32;
    let r = rng.gen_range(0.25..0.45) * side;
    let (cx, cy) = (rng.gen_range(r..=w as f32 - r), rng.gen_range(r..=h as f32 - r));
    RgbImage::from_fn(w, h, |x, y| {
        let (dx, dy) = (x as f32 - cx, y as f32 - cy);
        let inside = match shape {
            0 => dx * dx + dy * dy <= r * r,
            1 => dx.abs() <= r * 0.8 && dy.abs() <= r * 0.8,
            // An upward triangle: below the apex, above the base, within the widening sides.
            _ => dy >= -r && dy <= r * 0.6 && dx.abs() <= (dy + r) * 0.6,
        };
        if inside {
            fg
        } else {
            bg
        }
    })
}

fn save(img: RgbImage, path_stem: &Path, k: usize) {
    let img = DynamicImage::ImageRgb8(img);
    let (img, ext) = match k % 6 {
        0 => (img, "png"),
        1 => (img, "jpg"),
        2 => (img, "bmp"),
        3 => (DynamicImage::ImageLuma8(img.to_luma8()), "png"),
        4 => (DynamicImage::ImageRgba8(img.to_rgba8()), "png"),
        _ => (DynamicImage::ImageRgb16(img.to_rgb16()), "png"),
    };
    let img = if k % 11 == 10 {
        (DynamicImage::ImageRgba8(img.to_rgba8()), "gif")
    } else {
        (img, ext)
    };
    let path = path_stem.with_extension(img.1);
    img.0
        .save(&path)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args.first() else {
        eprintln!("usage: shapes DIR [TRAIN_PER_CLASS] [VAL_PER_CLASS]");
        std::process::exit(1);
    };
    let number = |i: usize, default: usize| {
        args.get(i).map_or(default, |s| {
            s.parse().unwrap_or_else(|_| {
                eprintln!("shapes: `{s}` is not a whole number");
                std::process::exit(1)
            })
        })
    };
    let (train, val) = (number(1, 100), number(2, 25));
    let mut rng = StdRng::seed_from_u64(7);
    for (split, n) in [("train", train), ("val", val)] {
        for (label, name) in SHAPES.iter().enumerate() {
            let class = Path::new(dir).join(split).join(name);
            std::fs::create_dir_all(&class)
                .unwrap_or_else(|e| panic!("cannot make {}: {e}", class.display()));
            for k in 0..n {
                save(draw(label, &mut rng), &class.join(format!("{k:05}")), k);
            }
        }
    }
    println!("wrote {} images to {dir}", 3 * (train + val));
}
