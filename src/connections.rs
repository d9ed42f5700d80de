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

const OPEN: u8 = 0;
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
    pub activity: AtomicU32,
    /// `activity` at the previous sweep (written by the sweep only).
    seen: AtomicU32,
    verdict: AtomicU8,
    /// The connection task's waker, so that a verdict is acted on at once.
    waker: Mutex<Option<Waker>>,
}

impl Watch {
    /// Called on each wake-up of the connection's task. `known` is the
    /// task's copy of the waker it registered: the lock is taken only when
    /// the waker changes (once per task in practice).
    pub fn verdict(&self, cx: &Context<'_>, known: &mut Option<Waker>) -> Verdict {
        if !known.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *known = Some(cx.waker().clone());
            *self.waker.lock().unwrap_or_else(|e| e.into_inner()) = known.clone();
        }
        // Read after registering: a verdict set before the waker was
        // stored is seen here; one set after it wakes the task.
        match self.verdict.load(Ordering::Acquire) {
            CLOSE => Verdict::Close,
            DRAIN => Verdict::Drain,
            _ => Verdict::Open,
        }
    }

    fn decide(&self, verdict: u8) {
        self.verdict.fetch_max(verdict, Ordering::Release);
        let waker = self.waker.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(w) = waker {
            w.wake();
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
    /// A new connection, watched until [`Connections::closed`].
    pub fn open(&self) -> Arc<Watch> {
        let mut open = self.lock();
        open.next_id += 1;
        let watch = Arc::new(Watch {
            id: open.next_id,
            activity: AtomicU32::new(0),
            // Odd: never "unchanged and idle" at the first sweep it meets.
            seen: AtomicU32::new(u32::MAX),
            verdict: AtomicU8::new(OPEN),
            waker: Mutex::new(None),
        });
        open.watches.insert(watch.id, watch.clone());
        watch
    }

    pub fn closed(&self, watch: &Watch) {
        let mut open = self.lock();
        open.watches.remove(&watch.id);
        if open.watches.is_empty() {
            self.emptied.notify_waiters();
        }
    }

    pub fn len(&self) -> usize {
        self.lock().watches.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Close every connection that did not move since the previous sweep
    /// and has no request in flight.
    pub fn sweep(&self) {
        for watch in self.lock().watches.values() {
            let now = watch.activity.load(Ordering::Relaxed);
            if now == watch.seen.swap(now, Ordering::Relaxed) && now.is_multiple_of(2) {
                watch.decide(CLOSE);
            }
        }
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
        {
            let open = self.lock();
            if open.watches.is_empty() {
                return;
            }
            for watch in open.watches.values() {
                watch.decide(DRAIN);
            }
        }
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
        let conns = Connections::default();
        let idle = conns.open();
        let busy = conns.open(); // one request in flight throughout
        let moving = conns.open(); // answers a request between sweeps
        busy.activity.fetch_add(1, Ordering::Relaxed);

        conns.sweep(); // the first sweep only looks
        for w in [&idle, &busy, &moving] {
            assert_eq!(registered(w).1, Verdict::Open);
        }
        moving.activity.fetch_add(2, Ordering::Relaxed);
        let (idle_wakes, _) = registered(&idle);
        conns.sweep();
        assert_eq!(registered(&idle).1, Verdict::Close);
        assert_eq!(
            idle_wakes.0.load(Ordering::Relaxed),
            1,
            "the idle task is woken"
        );
        assert_eq!(registered(&busy).1, Verdict::Open);
        assert_eq!(registered(&moving).1, Verdict::Open);
        conns.sweep();
        assert_eq!(registered(&moving).1, Verdict::Close);
        assert_eq!(registered(&busy).1, Verdict::Open);
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
            let (a_wakes, _) = registered(&a);
            let drain = tokio::spawn({
                let conns = conns.clone();
                async move { conns.drain().await }
            });
            tokio::task::yield_now().await;
            assert_eq!(a_wakes.0.load(Ordering::Relaxed), 1);
            assert_eq!(registered(&b).1, Verdict::Drain);
            conns.closed(&a);
            tokio::task::yield_now().await;
            assert!(!drain.is_finished(), "one connection is still open");
            conns.closed(&b);
            tokio::time::timeout(Duration::from_secs(1), drain)
                .await
                .expect("drained once the last one closed")
                .unwrap();
            // Verdicts only escalate: a drain never reopens a closed one.
            let c = conns.open();
            c.decide(DRAIN);
            c.decide(CLOSE);
            c.decide(DRAIN);
            assert_eq!(registered(&c).1, Verdict::Close);
        });
    }
}
