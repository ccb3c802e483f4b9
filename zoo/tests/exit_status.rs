//! The `spin` binary itself: a failure is one line on stderr naming the file, and a non-zero exit.
use std::process::Command;

#[test]
fn a_bad_file_is_one_line_and_a_non_zero_exit() {
    let out = Command::new(env!("CARGO_BIN_EXE_spin"))
        .args([
            "eval",
            "--model",
            "digits_vit_64_6",
            "--weights",
            "/nonexistent/w.safetensors",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("spin: /nonexistent/w.safetensors:"), "{err}");
    let ok = Command::new(env!("CARGO_BIN_EXE_spin"))
        .args(["zoo", "--format", "csv"])
        .output()
        .unwrap();
    assert!(ok.status.success());
}
