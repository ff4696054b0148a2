//! Host-memory policy of a process that holds one large model and whose big transient
//! allocations are the activations of forward passes.
//!
//! With its defaults glibc's malloc keeps what a pass frees: every thread that allocates
//! gets its own arena, each holding on to its own free chunks, and after the first large
//! free the dynamic mmap threshold rises (up to 32 MiB), so activation-sized buffers come
//! from the heap and stay resident as fragments once the pass is over. Two settings keep
//! the peak near the weights plus one pass's live activations (README, "Performance"):
//! - one arena for the whole process ([`tune_allocator`], at start): the compute pool's
//!   threads allocate little, and the HTTP threads' small allocations do not contend much;
//! - after a pass over many tokens that left the resident set 16 MiB above where the last
//!   release did, the freed pages go back to the OS ([`release_after_pass`]).
//!
//! Both are no-ops outside glibc.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Packed tokens from which a pass may have left enough behind to check.
const RELEASE_MIN_TOKENS: usize = 64;
/// Growth of the resident set since the last release that triggers the next one.
const RELEASE_GROWTH: usize = 16 << 20;

/// Resident bytes right after the last release.
static RESIDENT_AFTER_RELEASE: AtomicUsize = AtomicUsize::new(0);

/// Call first thing in `main`, before any other thread exists.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc parameters; called before other threads run.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// After a forward pass over `tokens` packed tokens (or image patches): when the resident
/// set has grown by [`RELEASE_GROWTH`] since the last release, return the heap's free
/// pages to the OS. Not after every pass: the next pass faults its pages in again, which
/// made 512-token prefills 10 to 20% slower (bench_model, alternating runs).
pub fn release_after_pass(tokens: usize) {
    if tokens < RELEASE_MIN_TOKENS {
        return;
    }
    let grown = resident_bytes().saturating_sub(RESIDENT_AFTER_RELEASE.load(Ordering::Relaxed));
    if grown > RELEASE_GROWTH {
        release_free_memory();
    }
}

/// Return the heap's free pages to the OS (e.g. after loading the model).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory malloc considers free.
    unsafe {
        libc::malloc_trim(0);
    }
    RESIDENT_AFTER_RELEASE.store(resident_bytes(), Ordering::Relaxed);
}

/// The process's resident set in bytes (0 where /proc is missing).
fn resident_bytes() -> usize {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
        .unwrap_or(0);
    pages * page_size()
}

fn page_size() -> usize {
    #[cfg(unix)]
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    #[cfg(not(unix))]
    let size = 4096;
    usize::try_from(size).unwrap_or(4096)
}
