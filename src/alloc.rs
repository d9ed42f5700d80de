//! Giving freed memory back to the kernel.
//!
//! glibc's malloc keeps freed pages of its heaps mapped; after a burst of
//! cold lookups (each allocates and frees tens of KiB in TLS and AWS
//! response handling) resident memory would stay at the burst's high-water
//! mark, with small live entries scattered over it. `malloc_trim(0)` returns
//! every whole free page (not only the heap's top), so resident memory
//! follows what is really cached.

/// Return free heap pages to the kernel (glibc only; a no-op elsewhere).
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: malloc_trim only releases memory malloc already considers free.
    unsafe {
        libc::malloc_trim(0);
    }
}
