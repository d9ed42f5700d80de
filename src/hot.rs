//! Per-thread copies of the answers being read.
//!
//! A hit on the shared answers cache writes memory that every core reads:
//! the shard's read lock, the answer's reference count, and the reference
//! counts of its body and `X-Sidecar-Secret` bytes. On two cores or more
//! those cache lines move from core to core on every request (perf at 256
//! connections on 2 cores: the shared read took 120 ns, 85 of them in the
//! read lock and the answer's count). So each thread that answers
//! hits keeps copies of the answers it serves, with body and header bytes
//! of its own, in a slot that in practice only it locks; a hit then writes
//! nothing another core reads.
//!
//! The copies follow the shared cache, never lead it:
//! - a copy is made from a shared read, and kept only if nothing was
//!   written to the shared cache since that read began;
//! - every write to the shared cache (a new answer, a revoked one) drops the
//!   key's copies from every slot, after the write;
//! - every sweep (each refresh-ahead tick) drops copies whose shared entry
//!   expired or was replaced, so a copied password does not outlive its
//!   cached answer by more than a tick.
//!
//! Only plain hits are copied (current version, not stale): everything else
//! is rare and goes to the shared cache.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;
use hyper::header::HeaderValue;

use crate::cache::{ConnKey, Served};

/// Copies kept per slot: enough for the conn_ids one Airflow component
/// reads, few enough to bound the memory (each copy is its answer's size).
pub const COPIES_PER_SLOT: usize = 64;

pub struct HotCopies {
    slots: Box<[Slot]>,
    /// Bumped after every write to the shared cache.
    writes: AtomicU64,
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
    pub body: Bytes,
    pub secret_header: HeaderValue,
    pub fetched_at: Instant,
    pub validated: bool,
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
    /// in this thread's slot, if it is a plain answer, the slot has room,
    /// and nothing was written to the shared cache since `start`: a write
    /// that raced the read may have replaced `served` already, and its
    /// [`forget`](Self::forget) may have run before this copy existed.
    #[inline(never)] // off the hot path's code
    pub fn offer(&self, served: &Arc<Served>, start: ReadStart, plain: bool) {
        if !plain {
            return;
        }
        let mut slot = self.slot();
        // Under the slot lock: a `forget` that runs after this sees the copy.
        if self.writes.load(Ordering::SeqCst) != start.0
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

    /// After a write of `key` to the shared cache: drop its copies.
    pub fn forget(&self, key: &str) {
        self.writes.fetch_add(1, Ordering::SeqCst);
        for slot in &self.slots {
            slot.0.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
        }
    }

    /// Keep only the copies for which `current` holds (given the copied
    /// answer): the sweep's check that each is still the shared entry.
    pub fn retain(&self, now: Instant, current: impl Fn(&Arc<Served>) -> bool) {
        for slot in &self.slots {
            let mut slot = slot.0.lock().unwrap_or_else(|e| e.into_inner());
            slot.retain(|_, copy| now < copy.expires_at && current(&copy.served));
        }
    }

    /// Copies in all slots (for tests and the memory figures).
    pub fn len(&self) -> usize {
        self.slots
            .iter()
            .map(|s| s.0.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for HotCopies {
    fn default() -> Self {
        Self::new()
    }
}
