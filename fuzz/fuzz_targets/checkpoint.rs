//! Any bytes as a timm safetensors checkpoint: parsed, then loaded into a small shared model.
#![no_main]
use libfuzzer_sys::fuzz_target;
use spin_core::prelude::*;

#[convmixer(dim = 4, kernel = 3, patch = 2, image = 4, classes = 2)]
#[shared_blocks(depth = 2, groups = 1, pattern = sequential)]
struct Tiny;

fuzz_target!(|data: &[u8]| {
    let _ = spin_core::checkpoint::read_tensors(std::path::Path::new("fuzz"), data);
    let path = std::env::temp_dir().join(format!("spin-fuzz-{}.safetensors", std::process::id()));
    if std::fs::write(&path, data).is_ok() {
        let mut m = Cpu::default().build_module::<Tiny, f32>();
        let _ = m.load_timm(&path);
    }
});
