//! Every numeric option of every subcommand refuses the values that make no sense, with a message
//! that names the option; the zoo listing filters, fits 100 columns and suggests near names. (What
//! the binary itself prints is tested in `zoo/tests/exit_status.rs`.)
use clap::Parser;
use zoo::cli::{self, Cli};

/// A minimal valid invocation of each subcommand that takes numeric options.
const BASE: &[(&str, &[&str])] = &[
    ("train", &["train", "--model", "digits_vit_64_6"]),
    ("compare", &["compare"]),
    (
        "eval",
        &["eval", "--model", "digits_vit_64_6", "--weights", "w.safetensors"],
    ),
    (
        "predict",
        &["predict", "--model", "digits_vit_64_6", "--weights", "w", "a.png"],
    ),
    ("bench", &["bench", "--model", "digits_vit_64_6"]),
    (
        "fips",
        &["fips", "--from", "w", "--model", "digits_vit_64_6", "--out", "o"],
    ),
    (
        "fuse",
        &[
            "fuse",
            "--from",
            "w",
            "--model",
            "digits_convmixer_64_8_ws2_sequential",
            "--out",
            "o",
            "--calib",
            "digits",
        ],
    ),
    ("recalibrate", &["recalibrate", "--weights", "w", "--out", "o"]),
    ("analyze", &["analyze", "--from", "w"]),
];

/// (subcommand, option, bad values)
const BAD: &[(&str, &str, &[&str])] = &[
    ("train", "--epochs", &["0", "-1", "x"]),
    ("train", "--batch", &["0", "1.5"]),
    ("train", "--lr", &["0", "-1", "nan", "inf"]),
    ("train", "--weight-decay", &["-0.1", "nan"]),
    ("train", "--label-smoothing", &["1", "2", "-0.1"]),
    ("train", "--clip", &["-1"]),
    ("train", "--stop-after", &["0"]),
    ("train", "--save-dtype", &["f8"]),
    ("train", "--data", &["mnist", "folder:"]),
    ("train", "--schedule", &["linear"]),
    ("train", "--augment", &["all"]),
    ("train", "--crop-scale", &["0", "1.5", "nan"]),
    ("train", "--rand-ops", &["-1", "x"]),
    ("train", "--rand-magnitude", &["11", "-1"]),
    ("train", "--mixup", &["-1", "inf"]),
    ("train", "--cutmix", &["-0.5"]),
    ("train", "--workers", &["0"]),
    ("train", "--warmup-epochs", &["-1"]),
    ("train", "--num-classes", &["0"]),
    ("compare", "--epochs", &["0"]),
    ("compare", "--batch", &["0"]),
    ("compare", "--lr", &["-1"]),
    ("eval", "--batch", &["0"]),
    ("predict", "--top", &["0"]),
    ("bench", "--batch", &["0"]),
    ("bench", "--iters", &["0"]),
    ("bench", "--threads", &["0"]),
    ("bench", "--dtype", &["bf16"]),
    ("fips", "--budget", &["0", "1.5", "-1"]),
    ("fips", "--sparsity", &["1", "-0.5"]),
    ("fips", "--calib-images", &["0"]),
    ("fips", "--group-size", &["0"]),
    ("fips", "--steps", &["0"]),
    ("fips", "--rows", &["0"]),
    ("fips", "--lr", &["0"]),
    ("fips", "--finetune-lr", &["-1"]),
    ("fips", "--sparse-schedule", &["random"]),
    ("fuse", "--calib-batches", &["0"]),
    ("fuse", "--calib-batch", &["1", "0"]),
    ("fuse", "--calib", &["mnist"]),
    ("fuse", "--refit", &["-1", "x"]),
    ("recalibrate", "--calib-batch", &["1"]),
    ("recalibrate", "--data", &["imagenet:"]),
    ("analyze", "--groups", &["0", "x"]),
    ("analyze", "--images", &["1"]),
    ("analyze", "--by", &["euclid"]),
    ("analyze", "--data", &["cifar10:"]),
];

#[test]
fn every_bad_value_is_refused_naming_its_option() {
    for &(cmd, option, values) in BAD {
        let base = BASE.iter().find(|(c, _)| *c == cmd).unwrap().1;
        Cli::try_parse_from(std::iter::once("spin").chain(base.iter().copied()))
            .unwrap_or_else(|e| panic!("{cmd}: the base invocation fails: {e}"));
        for &v in values {
            // `--opt=value`, so that clap reads a negative number as the option's value.
            let arg = format!("{option}={v}");
            let args = std::iter::once("spin")
                .chain(base.iter().copied())
                .chain([arg.as_str()]);
            let err = match Cli::try_parse_from(args) {
                Ok(_) => panic!("spin {cmd} {option} {v} was accepted"),
                Err(e) => cli::one_line(&e.render().to_string()),
            };
            assert!(!err.contains('\n'), "{err}");
            assert!(err.contains(option), "spin {cmd} {option} {v}: {err}");
        }
    }
}

fn zoo(args: &[&str]) -> Result<String, spin_core::error::Error> {
    let cli =
        Cli::try_parse_from(std::iter::once("spin").chain(["zoo"]).chain(args.iter().copied())).unwrap();
    let mut out = Vec::new();
    cli::run(cli, &mut out)?;
    Ok(String::from_utf8(out).unwrap())
}

#[test]
fn the_zoo_table_filters_and_fits_100_columns() {
    let all = zoo(&[]).unwrap();
    let widest = all.lines().map(|l| l.chars().count()).max().unwrap();
    assert!(widest <= 100, "{widest} columns:\n{all}");
    assert!(zoo(&["--wide"]).unwrap().contains("compression"));
    let vits = zoo(&["deit_tiny"]).unwrap();
    assert!(
        vits.contains("deit_tiny_patch16_224_ws12_all") && !vits.contains("convmixer"),
        "{vits}"
    );
    let glob = zoo(&["digits_*_ws2_*"]).unwrap();
    assert!(glob.contains("digits_convmixer_64_8_ws2_sequential"), "{glob}");
    assert!(
        glob.contains("digits_vit_64_6_ws2_sequential") && !glob.contains("ws4"),
        "{glob}"
    );
    let err = zoo(&["nothing_like_this"]).unwrap_err().to_string();
    assert!(err.contains("no zoo member matches"), "{err}");
}

#[test]
fn suggestions_are_ranked_by_edit_distance() {
    let err = zoo::find("digit_vit_64_6").err().unwrap().to_string();
    assert!(err.contains("(nearest: digits_vit_64_6,"), "{err}");
    let err = zoo::find("DEIT_TINY_PATCH16_224").err().unwrap().to_string();
    assert!(err.contains("(nearest: deit_tiny_patch16_224,"), "{err}");
    assert_eq!(zoo::edit_distance("kitten", "sitting"), 3);
    assert!(zoo::name_matches("convmixer_*_p14*", "convmixer_768_32_p14_k3"));
    assert!(!zoo::name_matches("convmixer_*_p14", "convmixer_768_32_p14_k3"));
}
