//! Any bytes as a CIFAR-10 binary batch.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = spin_core::data::check_cifar_batch(data);
});
