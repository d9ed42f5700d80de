//! The per-key states of one kind (connections, or plain values): read on
//! every lookup, changed only by [`Keys::apply`], which runs
//! [`crate::service::state::next`] atomically for the key.
//!
//! Readers never lock: an entry is an immutable `Arc<Entry>` in a
//! `quick_cache` (sharded, CLOCK eviction, at most `cache_size` keys), and a
//! transition replaces it whole. Writers of one key take one of a few
//! striped locks, so that "read the state, decide, write the next one" is
//! one step: transitions are rare (a miss, a refresh, a check), reads are
//! not.

use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::error::LookupError;
use crate::service::state::{lands, next, Entry, Event, Kept, Origin, Rules};

/// Generations are unique in the process: an entry that was swept or
/// evicted and written again never repeats one older work holds.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Writers' locks: enough that keys rarely share one.
const STRIPES: usize = 64;

/// The generation work on a key begins from (0: no entry).
pub fn generation<V>(entry: Option<&Arc<Entry<V>>>) -> u64 {
    entry.map_or(0, |e| e.generation)
}

pub struct Keys<K, V> {
    entries: quick_cache::sync::Cache<K, Arc<Entry<V>>>,
    stripes: Box<[Mutex<()>]>,
    hasher: ahash::RandomState,
    rules: Rules,
}

impl<K, V> Keys<K, V>
where
    K: Eq + Hash + Clone,
    V: Kept,
{
    /// At most `capacity` keys; `rules` without jitter (each transition draws its own).
    pub fn new(capacity: u64, rules: Rules) -> Self {
        Keys {
            entries: crate::cache::bounded(capacity),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            hasher: ahash::RandomState::new(),
            rules,
        }
    }

    /// The entry for `key` (`&str` works for a connection's key).
    pub fn get<Q>(&self, key: &Q) -> Option<Arc<Entry<V>>>
    where
        Q: Hash + quick_cache::Equivalent<K> + ?Sized,
    {
        self.entries.get(key)
    }

    /// Apply `event` from work of `origin` that began at generation `began`:
    /// the new entry if the event landed and changed the state.
    pub fn apply(
        &self,
        key: &K,
        origin: Origin,
        began: u64,
        event: Event<V>,
    ) -> Option<Arc<Entry<V>>> {
        let stripe = self.hasher.hash_one(key) as usize % STRIPES;
        let _one_writer = self.stripes[stripe]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let current = self.entries.get(key);
        if !lands(origin, began, current.as_deref(), &event) {
            return None;
        }
        let restaled = matches!(event, Event::Restaled(_));
        let decision = matches!(event, Event::Decided(_));
        let rules = Rules {
            jitter: fastrand::f64(),
            ..self.rules
        };
        let state = next(
            current.as_ref().map(|e| &e.state),
            event,
            Instant::now(),
            &rules,
        )?;
        let generation = match &current {
            // A re-proven stale copy is the same state: work that began from
            // it (the outage's retry) still lands.
            Some(current) if restaled => current.generation,
            _ => GENERATION.fetch_add(1, Ordering::Relaxed) + 1,
        };
        let decided = match &current {
            _ if decision => generation,
            Some(current) => current.decided,
            None => 0,
        };
        let entry = Arc::new(Entry {
            state,
            generation,
            decided,
        });
        self.entries.insert(key.clone(), entry.clone());
        Some(entry)
    }

    /// Apply `event` and return `answer`, the work's own result; when newer
    /// work landed meanwhile (a rotation check's verdict, a refresh), its
    /// word is the answer instead: it is what lookups get from now on.
    pub fn apply_or_current(
        &self,
        key: &K,
        origin: Origin,
        began: u64,
        event: Event<V>,
        answer: Result<Arc<V>, LookupError>,
    ) -> Result<Arc<V>, LookupError> {
        if self.apply(key, origin, began, event).is_some() {
            return answer;
        }
        let current = self.entries.get(key);
        match current
            .as_ref()
            .and_then(|e| e.state.answer(Instant::now()))
        {
            Some(current) => current.cloned().map_err(Clone::clone),
            None => answer,
        }
    }

    /// Every entry (a snapshot; entries may change meanwhile).
    pub fn iter(&self) -> impl Iterator<Item = (K, Arc<Entry<V>>)> + '_ {
        self.entries.iter()
    }

    /// Drop entries nothing needs any more (passwords included): answer
    /// expired, last good answer past `max_stale`, outage over, decision
    /// older than `max_stale`.
    pub fn sweep(&self) {
        let now = Instant::now();
        let max_stale = self.rules.max_stale;
        self.entries
            .retain(|_, e| now < e.state.keep_until(max_stale));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{ErrorCode, LookupError};
    use crate::service::state::State;
    use std::time::Duration;

    struct A(Instant);
    impl Kept for A {
        fn fetched_at(&self) -> Instant {
            self.0
        }
        fn expires_at(&self) -> Instant {
            self.0 + Duration::from_secs(60)
        }
    }

    fn keys() -> Keys<String, A> {
        Keys::new(
            100,
            Rules {
                secret_ttl: Duration::from_secs(300),
                negative_ttl: Duration::from_secs(30),
                error_ttl: Duration::from_secs(5),
                max_stale: Duration::from_secs(3600),
                jitter: 0.0,
            },
        )
    }

    /// A rotation check revokes while a refresh that began before it runs:
    /// the refresh's answer never comes back, whichever thread ends last.
    #[test]
    fn a_refresh_that_began_before_a_revocation_never_lands() {
        let keys = Arc::new(keys());
        let k = "c".to_string();
        let first = keys
            .apply(
                &k,
                Origin::Lookup,
                0,
                Event::Resolved(Arc::new(A(Instant::now()))),
            )
            .unwrap();
        let began = first.generation;
        let rejected = LookupError::new(ErrorCode::CredentialsRejected, "rotation check");
        keys.apply(&k, Origin::Fresh, began, Event::Decided(rejected))
            .unwrap();
        for origin in [Origin::Background, Origin::Lookup, Origin::Fresh] {
            let late = Event::Resolved(Arc::new(A(Instant::now())));
            assert!(keys.apply(&k, origin, began, late).is_none(), "{origin:?}");
        }
        assert!(matches!(
            keys.get("c").unwrap().state,
            State::Revoked { .. }
        ));
    }

    /// Many threads applying to one key: each landed write has a new
    /// generation, and the entry read after is the one written last.
    #[test]
    fn concurrent_writers_of_one_key_are_serialized() {
        let keys = Arc::new(keys());
        let landed: Vec<u64> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let keys = keys.clone();
                    s.spawn(move || {
                        (0..200)
                            .filter_map(|_| {
                                let k = "c".to_string();
                                let began = generation(keys.get("c").as_ref());
                                let e = Event::Resolved(Arc::new(A(Instant::now())));
                                keys.apply(&k, Origin::Lookup, began, e)
                                    .map(|e| e.generation)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        let mut sorted = landed.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), landed.len(), "a generation was reused");
        assert_eq!(keys.get("c").unwrap().generation, *sorted.last().unwrap());
    }

    #[test]
    fn the_sweep_keeps_a_decision_for_max_stale_and_drops_the_rest() {
        let keys = keys();
        let old = Instant::now() - Duration::from_secs(7200);
        keys.apply(
            &"old".into(),
            Origin::Lookup,
            0,
            Event::Resolved(Arc::new(A(old))),
        );
        let e = LookupError::new(ErrorCode::CredentialsRejected, "no");
        keys.apply(&"no".into(), Origin::Lookup, 0, Event::Decided(e));
        keys.sweep();
        assert!(keys.get("old").is_none(), "expired and past max_stale");
        assert!(
            keys.get("no").is_some(),
            "a decision stays for older work to see"
        );
    }
}
