//! The `spin` command: see `spin --help`.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let trains = matches!(
        args.get(1).map(String::as_str),
        Some("train" | "compare" | "fips")
    ) || args.iter().any(|a| a == "--train");
    keep_freed_memory(trains);
    std::process::exit(zoo::cli::main());
}

/// glibc returns every large freed block (≥ 128 KiB) to the kernel, so each activation buffer of a
/// training step is mapped, faulted in page by page and unmapped again (with TLB shootdowns across
/// cores): over a tenth of a step under `perf`. Blocks up to 32 MiB are served from the heap
/// instead, and freed memory is kept for reuse; peak memory is unchanged.
///
/// Commands that train also put every thread on one arena: the worker threads' own arenas still
/// handed freed heaps back and faulted them in again (`perf`: page faults and TLB-shootdown
/// interrupts about 7 % of DeiT-Tiny's batch-8 training step; with one arena the step 6–9 % faster,
/// ConvMixer-256's 4–5 %). Inference keeps the per-thread arenas: with one, DeiT-Small's batch-8
/// forward pass ran 10–15 % slower (cause not established).
fn keep_freed_memory(trains: bool) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        if trains {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = trains;
}
