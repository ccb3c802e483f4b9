//! The `spin` command: see `spin --help`.

fn main() {
    run_on_huge_pages();
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

/// glibc's tunable that marks its heaps and large blocks for transparent huge pages, where the
/// kernel gives them only on request (`madvise` mode, the common default).
const HUGE_PAGES_TUNABLE: &str = "glibc.malloc.hugetlb=1";

/// Runs this program again with [`HUGE_PAGES_TUNABLE`] set, which glibc reads only at start-up:
/// a training step touches a few hundred MB of activations and gradients, and on 4 KiB pages its
/// products and passes miss the TLB. On huge pages DeiT-Tiny's batch-8 step was 3–9 % faster and
/// ConvMixer-256's batch-32 step 7 % (alternated runs), DeiT-Small's forward pass level. Marking
/// large blocks from a wrapping allocator came too late: the heaps' pages were already mapped
/// small. If the program cannot be run again it goes on as it is.
fn run_on_huge_pages() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled");
        let tunables = std::env::var("GLIBC_TUNABLES").ok();
        let (Ok(mode), Ok(exe)) = (mode, std::env::current_exe()) else {
            return;
        };
        let Some(tunables) = tunables_for_huge_pages(&mode, tunables.as_deref()) else {
            return;
        };
        let mut args = std::env::args_os();
        let mut again = std::process::Command::new(exe);
        if let Some(arg0) = args.next() {
            again.arg0(arg0);
        }
        // `exec` returns only on failure.
        let _ = again.args(args).env("GLIBC_TUNABLES", tunables).exec();
    }
}

/// The `GLIBC_TUNABLES` to run again with, given the kernel's huge-page mode (the text of
/// `/sys/kernel/mm/transparent_hugepage/enabled`) and the current value: none where the kernel
/// gives huge pages always or never, or where the tunable is set already (so the second run does
/// not start a third, and `glibc.malloc.hugetlb=0` opts out).
#[cfg_attr(not(all(target_os = "linux", target_env = "gnu")), allow(dead_code))]
fn tunables_for_huge_pages(mode: &str, tunables: Option<&str>) -> Option<String> {
    let tunables = tunables.unwrap_or_default();
    if !mode.contains("[madvise]") || tunables.contains("glibc.malloc.hugetlb") {
        return None;
    }
    Some(if tunables.is_empty() {
        HUGE_PAGES_TUNABLE.to_string()
    } else {
        format!("{tunables}:{HUGE_PAGES_TUNABLE}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs again only in `madvise` mode and only once, keeping the user's other tunables.
    #[test]
    fn tunables_ask_for_huge_pages_once_and_only_in_madvise_mode() {
        let madvise = "always [madvise] never\n";
        assert_eq!(
            tunables_for_huge_pages(madvise, None).as_deref(),
            Some(HUGE_PAGES_TUNABLE)
        );
        assert_eq!(
            tunables_for_huge_pages(madvise, Some("glibc.malloc.arena_max=1")).as_deref(),
            Some("glibc.malloc.arena_max=1:glibc.malloc.hugetlb=1")
        );
        assert_eq!(tunables_for_huge_pages(madvise, Some(HUGE_PAGES_TUNABLE)), None);
        assert_eq!(
            tunables_for_huge_pages(madvise, Some("glibc.malloc.hugetlb=0")),
            None
        );
        assert_eq!(tunables_for_huge_pages("[always] madvise never\n", None), None);
        assert_eq!(tunables_for_huge_pages("always madvise [never]\n", None), None);
    }
}
