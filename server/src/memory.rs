//! Host-memory policy of a process that holds one large model and whose big transient
//! allocations are the activations of forward passes.
//!
//! With its defaults glibc's malloc keeps what a pass frees: every thread that allocates
//! gets its own arena, each holding on to its own free chunks, and after the first large
//! free the dynamic mmap threshold rises (up to 32 MiB), so activation-sized buffers come
//! from the heap and stay resident as fragments once the pass is over. Two settings keep
//! the peak near the weights plus one pass's live activations (README, "CPU performance"):
//! - one arena for the whole process ([`tune_allocator`], at start): the compute pool's
//!   threads allocate little, and the HTTP threads' small allocations do not contend much;
//! - after a pass over many tokens, the freed pages go back to the OS
//!   ([`release_after_pass`]); the next pass faults them in again (about a millisecond per
//!   10 MB, small next to the pass that freed them).
//!
//! Both are no-ops outside glibc.

/// Packed tokens from which a pass's activations are worth returning to the OS.
const RELEASE_MIN_TOKENS: usize = 64;

/// Call first thing in `main`, before any other thread exists.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc parameters; called before other threads run.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// After a forward pass over `tokens` packed tokens (or image patches): return the heap's
/// free pages to the OS when the pass was big enough to leave many behind.
pub fn release_after_pass(tokens: usize) {
    if tokens >= RELEASE_MIN_TOKENS {
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
}
