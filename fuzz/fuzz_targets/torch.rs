//! Any bytes as a PyTorch checkpoint file (zip or legacy pickle): read, never executed.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("spin-fuzz-torch-{}.pth", std::process::id()));
    if std::fs::write(&path, data).is_ok() {
        let _ = spin_core::checkpoint::read_torch(&path);
    }
});
