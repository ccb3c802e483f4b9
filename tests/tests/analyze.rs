//! `spin analyze` and `spin fuse --groups`: the analysis a user gets from a checkpoint, and the
//! check that a fused member is declared with the grouping it found.
use clap::Parser;
use spin_core::train::Analysis;
use zoo::args::Cli;
use zoo::cli;

fn spin(args: &[&str]) -> Result<String, spin_core::error::Error> {
    let cli = Cli::try_parse_from(std::iter::once("spin").chain(args.iter().copied())).unwrap();
    let mut out = Vec::new();
    cli::run(cli, &mut out)?;
    Ok(String::from_utf8(out).unwrap())
}

#[test]
fn analyze_writes_similarities_groupings_and_heatmaps_that_fuse_checks() {
    let dir = spin_tests::scratch("analyze");
    let ckpt = dir.join("unshared.safetensors");
    let model = zoo::build("digits_convmixer_64_8", 3).unwrap();
    model
        .save_timm(&ckpt, spin_core::checkpoint::StorageDtype::F32)
        .unwrap();
    let out_dir = dir.join("analysis");
    let (ckpt_s, out_s) = (ckpt.to_str().unwrap(), out_dir.to_str().unwrap());
    let text = spin(&[
        "analyze", "--from", ckpt_s, "--groups", "4", "--images", "40", "--out", out_s, "--quiet",
    ])
    .unwrap();
    assert!(
        text.contains("contiguous") && text.contains("pattern = ["),
        "{text}"
    );
    for f in ["analysis.json", "similarity.png", "similarity.svg"] {
        assert!(out_dir.join(f).is_file(), "{f} missing");
    }
    let json = out_dir.join("analysis.json");
    let mut an: Analysis = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!((an.images, an.groups, an.cka.len()), (40, 4, 8));
    for m in [&an.cka, &an.weight_cosine] {
        for (i, row) in m.iter().enumerate() {
            assert!((row[i] - 1.0).abs() < 1e-9);
            for (j, v) in row.iter().enumerate() {
                assert!((v - m[j][i]).abs() < 1e-12 && *v <= 1.0 + 1e-9);
            }
        }
    }
    // The best contiguous grouping is no worse than sequential, the unrestricted no worse than it.
    let cost = |m: &str| an.grouping(m).unwrap().cost;
    assert!(cost("contiguous") <= cost("sequential") + 1e-12);
    assert!(cost("clustered") <= cost("contiguous") + 1e-12);

    // fuse --groups FILE: a member declared with the grouping fuses, another is refused with the
    // declaration to write.
    let contiguous = an
        .groupings
        .iter_mut()
        .find(|g| g.method == "contiguous")
        .unwrap();
    contiguous.schedule = vec![0, 0, 1, 1, 2, 2, 3, 3];
    let clustered = an.groupings.iter_mut().find(|g| g.method == "clustered").unwrap();
    clustered.schedule = vec![0, 0, 1, 1, 2, 2, 3, 3];
    std::fs::write(&json, serde_json::to_string(&an).unwrap()).unwrap();
    let fused = dir.join("fused.safetensors");
    let fuse = |member: &str| {
        spin(&[
            "fuse",
            "--from",
            ckpt_s,
            "--model",
            member,
            "--groups",
            json.to_str().unwrap(),
            "--out",
            fused.to_str().unwrap(),
        ])
    };
    let ok = fuse("digits_convmixer_64_8_ws2_sequential").unwrap();
    assert!(ok.contains("contiguous grouping") && fused.is_file(), "{ok}");
    let err = fuse("digits_convmixer_64_8_ws2_strided").unwrap_err().to_string();
    assert!(
        err.contains("pattern = [0, 0, 1, 1, 2, 2, 3, 3]") && !err.contains('\n'),
        "{err}"
    );
}

#[test]
fn shared_models_are_not_analysed() {
    let dir = spin_tests::scratch("analyze-shared");
    let ckpt = dir.join("shared.safetensors");
    let model = zoo::build("digits_vit_64_6_ws2_similar", 1).unwrap();
    assert_eq!(model.info().schedule, vec![0, 1, 1, 1, 2, 2]);
    model
        .save_timm(&ckpt, spin_core::checkpoint::StorageDtype::F32)
        .unwrap();
    let err = spin(&["analyze", "--from", ckpt.to_str().unwrap(), "--quiet"]).unwrap_err();
    assert!(err.to_string().contains("shares its layers already"), "{err}");
}
