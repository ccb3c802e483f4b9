//! The `spin` command: see `spin --help`.

fn main() {
    keep_freed_memory();
    std::process::exit(zoo::cli::main());
}

/// glibc returns every large freed block (≥ 128 KiB) to the kernel, so each activation buffer of a
/// training step is mapped, faulted in page by page and unmapped again (with TLB shootdowns across
/// cores): over a tenth of a step under `perf`. Blocks up to 32 MiB are served from the heap
/// instead, and freed memory is kept for reuse; peak memory is unchanged.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}
