//! Property tests over every entry point that reads a user's file: whatever the bytes, a typed
//! error or a value, never a panic. The cargo-fuzz targets in `fuzz/` drive the same functions.
use proptest::prelude::*;
use spin_core::checkpoint::{read_tensors, TimmCheckpoint};
use spin_core::data::{check_cifar_batch, check_digits};
use spin_core::prelude::*;
use std::path::Path;

#[convmixer(dim = 4, kernel = 3, patch = 2, image = 4, classes = 2, depth = 2)]
struct Tiny;

fn valid_checkpoint() -> Vec<u8> {
    let dev = Cpu::seed_from_u64(0);
    let m = dev.build_module::<Tiny, f32>();
    // One folder per thread: two tests call this at once, and `scratch` empties its folder.
    let folder = format!("robust-ckpt-{:?}", std::thread::current().id());
    let path = spin_tests::scratch(&folder).join("m.safetensors");
    m.save_timm(&path).unwrap();
    std::fs::read(path).unwrap()
}

fn load_bytes(bytes: &[u8]) -> Result<(), spin_core::Error> {
    // Through the file path users take.
    let path = std::env::temp_dir().join(format!(
        "spin-prop-{}-{:?}.safetensors",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(&path, bytes).unwrap();
    let dev = Cpu::default();
    let mut m = dev.build_module::<Tiny, f32>();
    let r = m.load_timm(&path);
    let _ = std::fs::remove_file(&path);
    r
}

/// Overwrites the bytes at `flips`, then with `truncate` cuts the file at `cut`.
fn corrupt(
    bytes: &mut Vec<u8>,
    flips: Vec<(prop::sample::Index, u8)>,
    cut: prop::sample::Index,
    truncate: bool,
) {
    for (i, v) in flips {
        let i = i.index(bytes.len());
        bytes[i] = v;
    }
    if truncate {
        let n = cut.index(bytes.len());
        bytes.truncate(n);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_the_checkpoint_reader(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = read_tensors(Path::new("x"), &bytes);
        prop_assert!(load_bytes(&bytes).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_pytorch_reader(
        magic in prop::sample::select(vec![&b"PK\x03\x04"[..], &b"\x80\x02"[..], &b"\x80\x05"[..]]),
        rest in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let bytes = [magic, &rest].concat();
        prop_assert!(load_bytes(&bytes).is_err());
    }

    #[test]
    fn corrupted_pytorch_files_give_errors_not_panics(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = std::fs::read(spin_tests::fixture("torch/legacy.pth")).unwrap();
        if flips.is_empty() && !truncate {
            // Unchanged: a real file of another model, refused by its shapes.
            prop_assert!(load_bytes(&bytes).is_err());
        }
        corrupt(&mut bytes, flips, cut, truncate);
        let _ = load_bytes(&bytes);
    }

    #[test]
    fn corrupted_checkpoints_give_errors_not_panics(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = valid_checkpoint();
        corrupt(&mut bytes, flips, cut, truncate);
        let _ = load_bytes(&bytes); // Ok (a flip inside a value) or a typed error
    }

    #[test]
    fn digits_text_never_panics(text in "[0-9,\\n -]{0,400}") {
        let _ = check_digits(&text);
    }

    #[test]
    fn valid_digit_rows_parse(rows in proptest::collection::vec((proptest::collection::vec(0u8..=16, 64), 0u8..10), 1..20)) {
        let text: String = rows
            .iter()
            .map(|(px, l)| px.iter().map(|v| v.to_string()).chain([l.to_string()]).collect::<Vec<_>>().join(","))
            .collect::<Vec<_>>()
            .join("\n");
        prop_assert_eq!(check_digits(&text).unwrap(), rows.len());
    }

    #[test]
    fn cifar_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..8000)) {
        match check_cifar_batch(&bytes) {
            Ok(n) => prop_assert_eq!(n * 3073, bytes.len()),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}

#[test]
fn a_valid_checkpoint_loads_and_an_empty_file_is_an_error() {
    assert!(load_bytes(&valid_checkpoint()).is_ok());
    let err = load_bytes(&[]).unwrap_err().to_string();
    assert!(err.contains("not a valid safetensors file"), "{err}");
}

#[test]
fn wrong_dtype_is_named() {
    use safetensors::tensor::{Dtype, TensorView};
    let data = vec![0u8; 4 * 3 * 2 * 2 * 4];
    let view = TensorView::new(Dtype::I32, vec![4, 3, 2, 2], &data).unwrap();
    let bytes = safetensors::tensor::serialize([("stem.0.weight".to_string(), view)], &None).unwrap();
    let err = load_bytes(&bytes).unwrap_err();
    assert!(
        matches!(&err, spin_core::Error::Dtype { key, dtype, .. } if key == "stem.0.weight" && dtype == "I32"),
        "{err}"
    );
}
