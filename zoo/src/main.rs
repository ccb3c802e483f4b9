//! The `spin` command: see `spin --help`.

fn main() {
    keep_freed_memory();
    std::process::exit(zoo::cli::main());
}

/// glibc returns every large freed block (≥ 128 KiB) to the kernel, so each activation buffer of a
/// training step is mapped, faulted in page by page and unmapped again (with TLB shootdowns across
/// cores): over a tenth of a step under `perf`. Blocks up to 32 MiB are served from the heap
/// instead, and freed memory is kept for reuse; peak memory is unchanged.
///
/// The worker threads' own arenas still handed freed memory at the top of their heaps back and
/// faulted it in again (`perf`: page faults and TLB-shootdown interrupts about 7 % of DeiT-Tiny's
/// batch-8 training step). A top pad of 64 MiB keeps that much free at each heap's top: the step
/// 5–10 % faster, ConvMixer-256's batch-32 step 8 %, inference and the digits members' small steps
/// level, peak memory level. (One arena for all threads stopped the faults too, but made the
/// digits members' steps 25 % slower and DeiT-Small's forward pass 10–15 %.)
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}
