//! The `spin` binary itself: a failure is one line on stderr naming the file or the option, and
//! status 1; help goes to stdout; a closed pipe ends quietly.
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

#[test]
fn the_binary_reports_argument_errors_on_one_line_with_status_1() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spin"))
        .args(["train", "--model", "digits_vit_64_6", "--batch", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("spin: ") && err.contains("--batch"), "{err}");
    // Help still goes to stdout with status 0.
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_spin"))
        .args(["train", "--help"])
        .output()
        .unwrap();
    assert!(help.status.success());
    let text = String::from_utf8(help.stdout).unwrap();
    assert!(
        text.contains("--label-smoothing") && text.contains("in [0, 1)"),
        "{text}"
    );
}

#[test]
fn a_closed_pipe_ends_quietly() {
    use std::io::Read;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_spin"))
        .args(["zoo", "--format", "json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap(); // then the reader goes away
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{:?}", out.status);
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
}
