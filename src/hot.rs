//! Per-thread copies of the answers being read.
//!
//! A hit on the shared answers cache writes memory that every core reads:
//! the shard's read lock, the answer's reference count, and the reference
//! counts of its body and `X-Sidecar-Secret` bytes. On two cores or more
//! those cache lines move from core to core on every request (perf at 256
//! connections on 2 cores: the shared read took 120 ns, 85 of them in the
//! read lock and the answer's count). So each thread that answers
//! hits keeps copies of the answers it serves, with body and header bytes
//! of its own, in a slot of its own (one per core; threads share slots only
//! when there are more of them than cores); a hit then writes, in the
//! common case, nothing another core reads.
//!
//! The copies follow the shared cache, never lead it:
//! - every write to the shared cache (a new answer, a revoked one) first
//!   drops the key's copies from every slot, and no copy is made while a
//!   write is under way: once the new answer is visible, no thread holds a
//!   copy of the old one;
//! - a copy is made from a shared read, and kept only if no write began or
//!   ended since that read began;
//! - every sweep (each refresh-ahead tick) drops copies whose shared entry
//!   expired or left the cache (evicted), so a copied password does not
//!   outlive its cached answer by more than a tick; that check reads each
//!   copied entry, which also keeps it warm for the cache's eviction policy
//!   (hits on copies never reach it).
//!
//! Only plain hits are copied (current version, not stale), with bodies up
//! to [`MAX_COPIED_BODY`]: everything else is rare and goes to the shared
//! cache.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;
use hyper::header::HeaderValue;

use crate::cache::{ConnKey, Served};

/// Copies kept per slot: enough for the conn_ids one Airflow component
/// reads, few enough to bound the memory.
pub const COPIES_PER_SLOT: usize = 64;

/// Larger answers (a connection with a big `extra`) are not copied: a slot
/// holds at most `COPIES_PER_SLOT` × this (256 KiB) of copied bytes.
pub const MAX_COPIED_BODY: usize = 4096;

pub struct HotCopies {
    slots: Box<[Slot]>,
    /// Bumped when a write to the shared cache begins and when it ends.
    writes: AtomicU64,
    /// Writes under way: no copy is made meanwhile.
    writing: AtomicU64,
}

/// One thread's copies, on cache lines of their own.
#[repr(align(128))]
#[derive(Default)]
struct Slot(Mutex<HashMap<ConnKey, Kept, ahash::RandomState>>);

/// What a hit needs, in the slot itself: a hit touches no shared memory.
struct Kept {
    /// The shared answer copied: what the sweep compares with the cache.
    served: Arc<Served>,
    body: Bytes,
    secret_header: HeaderValue,
    fetched_at: Instant,
    expires_at: Instant,
    validated: bool,
    /// Read since refresh-ahead last asked (the copy's `Served::used`).
    read: bool,
}

/// A plain hit, answered from this thread's copy.
pub struct HotHit {
    /// The Airflow JSON, password included: never logged.
    pub body: Bytes,
    pub secret_header: HeaderValue,
    pub fetched_at: Instant,
    pub validated: bool,
}

impl std::fmt::Debug for HotHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HotHit")
            .field("body", &"[redacted]")
            .field("secret", &self.secret_header)
            .field("validated", &self.validated)
            .finish()
    }
}

/// A write to the shared cache under way (see [`HotCopies::begin_write`]).
#[must_use]
pub struct Writing<'a>(&'a HotCopies);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.writes.fetch_add(1, Ordering::SeqCst);
        self.0.writing.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The shared cache's write count when a read began (see [`HotCopies::offer`]).
#[derive(Clone, Copy)]
pub struct ReadStart(u64);

impl HotCopies {
    /// One slot per core the process may run on.
    pub fn new() -> Self {
        let slots = std::thread::available_parallelism().map_or(1, |n| n.get().min(64));
        HotCopies {
            slots: (0..slots).map(|_| Slot::default()).collect(),
            writes: AtomicU64::new(0),
            writing: AtomicU64::new(0),
        }
    }

    fn slot(&self) -> MutexGuard<'_, HashMap<ConnKey, Kept, ahash::RandomState>> {
        thread_local! {
            static SLOT: usize = {
                static NEXT: AtomicUsize = AtomicUsize::new(0);
                NEXT.fetch_add(1, Ordering::Relaxed)
            };
        }
        let slot = &self.slots[SLOT.with(|s| *s) % self.slots.len()];
        slot.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This thread's copy of `key`'s answer, unless it expired at `now`.
    pub fn get(&self, key: &str, now: Instant) -> Option<HotHit> {
        let mut slot = self.slot();
        let copy = slot.get_mut(key)?;
        if now >= copy.expires_at {
            slot.remove(key); // a password no longer served is not kept
            return None;
        }
        copy.read = true;
        Some(HotHit {
            body: copy.body.clone(),
            secret_header: copy.secret_header.clone(),
            fetched_at: copy.fetched_at,
            validated: copy.validated,
        })
    }

    /// Whether any copy of `key` was read since the last call (which
    /// clears that): refresh-ahead's "in use", with `Served::used`.
    pub fn take_read(&self, key: &str) -> bool {
        let mut read = false;
        for slot in &self.slots {
            let mut slot = slot.0.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(copy) = slot.get_mut(key) {
                read |= std::mem::take(&mut copy.read);
            }
        }
        read
    }

    /// Call before reading the shared cache for an answer to [`offer`](Self::offer).
    pub fn read_start(&self) -> ReadStart {
        ReadStart(self.writes.load(Ordering::SeqCst))
    }

    /// Keep a copy of `served` (read from the shared cache after `start`)
    /// in this thread's slot, if it is a plain answer of copyable size, the
    /// slot has room, and no write to the shared cache began or ended since
    /// `start` or is under way: `served` may be what such a write replaces,
    /// and the write may have dropped the key's copies before this one existed.
    #[inline(never)] // off the hot path's code
    pub fn offer(&self, served: &Arc<Served>, start: ReadStart, plain: bool) {
        if !plain || served.body.len() > MAX_COPIED_BODY {
            return;
        }
        let mut slot = self.slot();
        // Under the slot lock: a write that begins after this drops the copy.
        if self.writing.load(Ordering::SeqCst) != 0
            || self.writes.load(Ordering::SeqCst) != start.0
            || (slot.len() >= COPIES_PER_SLOT && !slot.contains_key(&served.key))
        {
            return;
        }
        let Ok(secret_header) = HeaderValue::from_bytes(served.secret_header.as_bytes()) else {
            return;
        };
        slot.insert(
            served.key.clone(),
            Kept {
                served: served.clone(),
                body: Bytes::copy_from_slice(&served.body),
                secret_header,
                fetched_at: served.fetched_at,
                expires_at: served.expires_at,
                validated: served.validated(),
                read: false,
            },
        );
    }

    /// Before a write of `key` to the shared cache: its copies go, and
    /// none is made until the returned guard drops (after the write).
    pub fn begin_write(&self, key: &str) -> Writing<'_> {
        self.writing.fetch_add(1, Ordering::SeqCst);
        self.writes.fetch_add(1, Ordering::SeqCst);
        for slot in &self.slots {
            slot.0.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
        }
        Writing(self)
    }

    /// Keep only the copies for which `current` holds (given the copied
    /// answer): the sweep's check that each is still the shared entry.
    pub fn retain(&self, now: Instant, current: impl Fn(&Arc<Served>) -> bool) {
        for slot in &self.slots {
            let mut slot = slot.0.lock().unwrap_or_else(|e| e.into_inner());
            slot.retain(|_, copy| now < copy.expires_at && current(&copy.served));
        }
    }

    /// Copies in all slots (for tests).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.slots
            .iter()
            .map(|s| s.0.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for HotCopies {
    fn default() -> Self {
        Self::new()
    }
}
