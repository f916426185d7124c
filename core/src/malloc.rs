//! glibc malloc settings for the proxies' data path.
//!
//! Relaying a stream allocates a buffer per chunk (up to 64 KiB, held until TLS has sent it)
//! and frees it soon after, so a busy worker's heap grows and shrinks by a few MiB all the
//! time. With glibc's defaults a thread's arena hands the freed top of its heap back to the
//! kernel as soon as 128 KiB are free (and a chunk from 128 KiB up is a fresh `mmap`), so the
//! next chunks fault their pages in again and the kernel zeroes them: at full single-stream
//! throughput that was ~15 % of ztunnel's CPU (page faults, `madvise`, zeroing), measured with
//! `perf` in the data-path benchmark. Keeping up to [`TRIM_THRESHOLD`] free at the top of each
//! heap, and serving allocations up to [`MMAP_THRESHOLD`] from the heap, stops it; the price
//! is at most that much retained memory per malloc arena that was busy (glibc has up to eight
//! arenas per CPU, one per thread in practice).

/// Free memory kept at the top of a heap before it is returned to the kernel.
pub const TRIM_THRESHOLD: usize = 2 << 20;
/// Allocations from this size up get a mapping of their own.
pub const MMAP_THRESHOLD: usize = 1 << 20;

/// Applies the settings above; call it first thing in `main`. Explicit values also turn off
/// glibc's dynamic threshold adjustment, so the behaviour does not depend on the allocation
/// history. A no-op where the C library is not glibc.
pub fn tune_for_relaying() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's parameters; it is thread-safe.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int);
    }
}
