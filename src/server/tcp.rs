//! The credential listener's open connections: one sweep closes the idle
//! ones, and shutdown drains them all.
//!
//! One timer for every connection instead of one per connection (hyper's
//! `header_read_timeout`, or an interval per connection, is polled on every
//! request): a connection's task reads one flag of its own per wake-up, and
//! the sweep reads each connection's activity counter every [`IDLE_CLOSE`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Waker};
use std::time::Duration;

use tokio::sync::Notify;

/// A connection with no request in flight for this long (an idle
/// keep-alive, or a client trickling a request head) is closed: between one
/// and two periods after it last moved.
pub const IDLE_CLOSE: Duration = Duration::from_secs(10);

/// Verdict bits: set by the sweep or shutdown, read by the connection's task.
const DRAIN: u8 = 1;
const CLOSE: u8 = 2;

/// What the sweep or shutdown decided for a connection.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Verdict {
    Open,
    /// Shutting down: finish the request in flight, then close.
    Drain,
    /// Idle: close now.
    Close,
}

/// One connection as the sweep sees it.
pub struct Watch {
    id: u64,
    /// Bumped when a request starts and when it ends (odd: one in flight).
    activity: AtomicU32,
    /// `activity` at the previous sweep (written by the sweep only).
    seen: AtomicU32,
    verdict: AtomicU8,
    /// The connection task's waker, so that a verdict is acted on at once.
    waker: Mutex<Option<Waker>>,
}

impl Watch {
    /// A request answered at once (started and ended): the sweep sees it move.
    pub fn answered(&self) {
        self.activity.fetch_add(2, Ordering::Relaxed);
    }

    /// A request under way until the guard drops (answered, or dropped by
    /// hyper when the client went away): the sweep leaves it alone.
    pub fn in_flight(&self) -> InFlight<'_> {
        self.activity.fetch_add(1, Ordering::Relaxed);
        InFlight(&self.activity)
    }

    /// Called on each wake-up of the connection's task, which alone moves
    /// `activity`. `known` is the task's copy of the waker it registered:
    /// the lock is taken only when the waker changes (once per task).
    pub fn verdict(&self, cx: &Context<'_>, known: &mut Option<Waker>) -> Verdict {
        if !known.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *known = Some(cx.waker().clone());
            *self.waker.lock().unwrap_or_else(|e| e.into_inner()) = known.clone();
        }
        // Read after registering: a verdict set before the waker was
        // stored is seen here; one set after it wakes the task.
        let bits = self.verdict.load(Ordering::Acquire);
        if bits & CLOSE != 0 {
            // The sweep decided on what it saw; a request may have started
            // since. Checked here, where nothing else moves `activity`.
            if self.activity.load(Ordering::Relaxed) == self.seen.load(Ordering::Relaxed) {
                return Verdict::Close;
            }
            self.verdict.fetch_and(!CLOSE, Ordering::AcqRel);
        }
        if bits & DRAIN != 0 {
            Verdict::Drain
        } else {
            Verdict::Open
        }
    }

    /// Set a verdict bit; the waker to call, if the task registered one.
    #[must_use]
    fn decide(&self, bit: u8) -> Option<Waker> {
        self.verdict.fetch_or(bit, Ordering::Release);
        self.waker.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// See [`Watch::in_flight`].
pub struct InFlight<'a>(&'a AtomicU32);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// A connection's place in [`Connections`]: dropped with the connection's
/// task (ended, panicked or aborted), it leaves.
pub struct Registration {
    connections: Arc<Connections>,
    pub watch: Arc<Watch>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut open = self.connections.lock();
        open.watches.remove(&self.watch.id);
        if open.watches.is_empty() {
            self.connections.emptied.notify_waiters();
        }
    }
}

/// Every open connection of one listener.
#[derive(Default)]
pub struct Connections {
    open: Mutex<Open>,
    emptied: Notify,
}

#[derive(Default)]
struct Open {
    next_id: u64,
    watches: HashMap<u64, Arc<Watch>>,
}

impl Connections {
    /// A new connection, watched until its [`Registration`] is dropped.
    pub fn open(self: &Arc<Self>) -> Registration {
        let mut open = self.lock();
        open.next_id += 1;
        let watch = Arc::new(Watch {
            id: open.next_id,
            activity: AtomicU32::new(0),
            // Odd: never "unchanged and idle" at the first sweep it meets.
            seen: AtomicU32::new(u32::MAX),
            verdict: AtomicU8::new(0),
            waker: Mutex::new(None),
        });
        open.watches.insert(watch.id, watch.clone());
        Registration {
            connections: self.clone(),
            watch,
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().watches.len()
    }

    /// Close every connection that did not move since the previous sweep
    /// and has no request in flight.
    pub fn sweep(&self) {
        let wake: Vec<Waker> = self
            .lock()
            .watches
            .values()
            .filter_map(|watch| {
                let now = watch.activity.load(Ordering::Relaxed);
                let idle = now == watch.seen.swap(now, Ordering::Relaxed) && now.is_multiple_of(2);
                if idle {
                    watch.decide(CLOSE)
                } else {
                    None
                }
            })
            .collect();
        // Woken outside the lock: accepting and closing never wait on it.
        wake.into_iter().for_each(Waker::wake);
    }

    /// Sweep every `period`, forever.
    pub async fn sweep_every(&self, period: Duration) {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.sweep();
        }
    }

    /// Ask every connection to finish its request in flight and close, and
    /// wait until all have.
    pub async fn drain(&self) {
        let emptied = self.emptied.notified();
        tokio::pin!(emptied);
        emptied.as_mut().enable();
        let wake: Vec<Waker> = {
            let open = self.lock();
            if open.watches.is_empty() {
                return;
            }
            open.watches
                .values()
                .filter_map(|w| w.decide(DRAIN))
                .collect()
        };
        wake.into_iter().for_each(Waker::wake);
        emptied.await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    /// Counts its wake-ups.
    struct Counting(AtomicUsize);
    impl Wake for Counting {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn registered(watch: &Watch) -> (Arc<Counting>, Verdict) {
        let counting = Arc::new(Counting(AtomicUsize::new(0)));
        let waker = Waker::from(counting.clone());
        let verdict = watch.verdict(&Context::from_waker(&waker), &mut None);
        (counting, verdict)
    }

    #[test]
    fn the_sweep_closes_only_what_did_not_move_with_nothing_in_flight() {
        let conns = Arc::new(Connections::default());
        let idle = conns.open();
        let busy = conns.open(); // one request in flight throughout
        let moving = conns.open(); // answers a request between sweeps
        busy.watch.activity.fetch_add(1, Ordering::Relaxed);

        conns.sweep(); // the first sweep only looks
        for r in [&idle, &busy, &moving] {
            assert_eq!(registered(&r.watch).1, Verdict::Open);
        }
        moving.watch.activity.fetch_add(2, Ordering::Relaxed);
        let (idle_wakes, _) = registered(&idle.watch);
        conns.sweep();
        assert_eq!(
            idle_wakes.0.load(Ordering::Relaxed),
            1,
            "the idle task is woken"
        );
        assert_eq!(registered(&idle.watch).1, Verdict::Close);
        assert_eq!(registered(&busy.watch).1, Verdict::Open);
        assert_eq!(registered(&moving.watch).1, Verdict::Open);
        conns.sweep();
        assert_eq!(registered(&moving.watch).1, Verdict::Close);
        assert_eq!(registered(&busy.watch).1, Verdict::Open);
        assert_eq!(conns.len(), 3);
        drop((idle, busy, moving));
        assert_eq!(conns.len(), 0, "a dropped registration leaves");
    }

    /// The sweep decides on what it read; a request that starts before the
    /// task acts on the verdict is not cut, and the verdict is withdrawn.
    #[test]
    fn a_request_that_starts_after_the_sweep_decided_is_not_cut() {
        let conns = Arc::new(Connections::default());
        let conn = conns.open();
        conns.sweep();
        conns.sweep(); // idle for a whole period: closing
        conn.watch.activity.fetch_add(1, Ordering::Relaxed); // a request starts
        assert_eq!(registered(&conn.watch).1, Verdict::Open);
        conn.watch.activity.fetch_add(1, Ordering::Relaxed); // and ends
        assert_eq!(
            registered(&conn.watch).1,
            Verdict::Open,
            "withdrawn, not pending"
        );
        conns.sweep(); // it moved: only looks
        assert_eq!(registered(&conn.watch).1, Verdict::Open);
        conns.sweep();
        assert_eq!(registered(&conn.watch).1, Verdict::Close);
    }

    #[test]
    fn drain_wakes_every_connection_and_waits_for_the_last() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let conns = Arc::new(Connections::default());
            tokio::time::timeout(Duration::from_secs(1), conns.drain())
                .await
                .expect("nothing open: drained at once");
            let a = conns.open();
            let b = conns.open();
            let (a_wakes, _) = registered(&a.watch);
            let drain = tokio::spawn({
                let conns = conns.clone();
                async move { conns.drain().await }
            });
            tokio::task::yield_now().await;
            assert_eq!(a_wakes.0.load(Ordering::Relaxed), 1);
            assert_eq!(registered(&b.watch).1, Verdict::Drain);
            drop(a);
            tokio::task::yield_now().await;
            assert!(!drain.is_finished(), "one connection is still open");
            // An idle close during the drain wins; the drain stays.
            conns.sweep();
            conns.sweep();
            assert_eq!(registered(&b.watch).1, Verdict::Close);
            b.watch.activity.fetch_add(1, Ordering::Relaxed);
            assert_eq!(registered(&b.watch).1, Verdict::Drain);
            drop(b);
            tokio::time::timeout(Duration::from_secs(1), drain)
                .await
                .expect("drained once the last one closed")
                .unwrap();
        });
    }
}
