//! Single-flight whose work runs in a task of its own, used by every
//! expensive path of [`crate::service::Resolver`] (cold lookups, refreshes,
//! rotation checks, variables, config): callers that give up never cancel
//! it, and a new run can be made to need a free slot of a bound.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::{watch, Semaphore};

/// Why an [`Inflight`] run gave no value.
#[derive(Debug)]
pub enum NotRun {
    /// A new run was needed and every slot was taken.
    Busy,
    /// The run's task ended without a value (it panicked).
    Lost,
}

/// Single-flight whose work runs in a task of its own: callers that give up
/// never cancel it. (A cache's own single-flight runs the loader in the
/// first caller's task, so a caller that leaves cancels it and the next
/// caller starts over: 20 impatient clients made 77 login attempts that way.)
pub struct Inflight<K, V> {
    running: Arc<Mutex<HashMap<K, watch::Receiver<Option<V>>>>>,
}

impl<K, V> Default for Inflight<K, V> {
    fn default() -> Self {
        Inflight {
            running: Arc::default(),
        }
    }
}

impl<K, V> Inflight<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub fn is_running(&self, key: &K) -> bool {
        self.running
            .lock()
            .expect("inflight lock")
            .contains_key(key)
    }

    /// The value of the run under way for `key`, or of a new run of `work`.
    /// With `slots`, a new run needs a free slot (held until it ends).
    pub async fn run<F>(
        &self,
        key: K,
        slots: Option<&Arc<Semaphore>>,
        work: impl FnOnce() -> F,
    ) -> Result<V, NotRun>
    where
        F: Future<Output = V> + Send + 'static,
    {
        let mut rx = {
            let mut running = self.running.lock().expect("inflight lock");
            match running.get(&key) {
                Some(rx) => rx.clone(),
                None => {
                    let permit = match slots {
                        Some(s) => Some(s.clone().try_acquire_owned().map_err(|_| NotRun::Busy)?),
                        None => None,
                    };
                    let (tx, rx) = watch::channel(None);
                    running.insert(key.clone(), rx.clone());
                    let guard = RemoveOnDrop {
                        running: self.running.clone(),
                        key,
                    };
                    let work = work();
                    tokio::spawn(async move {
                        let value = work.await;
                        // Out of the map before anyone sees the value: a
                        // caller who got it and asks again (refresh=true)
                        // must start a new run, not join this finished one.
                        drop(guard);
                        let _ = tx.send(Some(value));
                        drop(permit);
                    });
                    rx
                }
            }
        };
        let value = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| NotRun::Lost)?
            .clone();
        value.ok_or(NotRun::Lost)
    }
}

/// Removes a finished (or panicked) run from the map.
struct RemoveOnDrop<K: Hash + Eq, V> {
    running: Arc<Mutex<HashMap<K, watch::Receiver<Option<V>>>>>,
    key: K,
}

impl<K: Hash + Eq, V> Drop for RemoveOnDrop<K, V> {
    fn drop(&mut self) {
        if let Ok(mut running) = self.running.lock() {
            running.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn asking_again_after_a_run_finished_starts_a_new_run() {
        let inflight: Inflight<&str, u32> = Inflight::default();
        let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
        for i in 0..2000 {
            let runs2 = runs.clone();
            let work =
                move || async move { runs2.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 };
            let got = inflight.run("k", None, work).await.unwrap();
            // The waiter may run on the other worker the moment the value
            // is sent: the finished run must already be out of the map.
            assert_eq!(got, i + 1, "iteration {i} joined a finished run");
        }
    }

    #[tokio::test]
    async fn a_caller_that_gives_up_does_not_cancel_the_shared_run() {
        let inflight: Inflight<&str, u32> = Inflight::default();
        let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let work = |runs: Arc<std::sync::atomic::AtomicU32>| {
            move || async move {
                runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
                7
            }
        };
        // The first caller leaves early; the run goes on and later callers join it.
        let gave_up = tokio::time::timeout(
            Duration::from_millis(20),
            inflight.run("k", None, work(runs.clone())),
        )
        .await;
        assert!(gave_up.is_err());
        let joined = inflight.run("k", None, work(runs.clone())).await.unwrap();
        assert_eq!(joined, 7);
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_new_run_needs_a_slot_a_joining_caller_does_not() {
        let inflight: Inflight<&str, u32> = Inflight::default();
        let slots = Arc::new(Semaphore::new(1));
        let slow = || async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            1
        };
        let a = inflight.run("a", Some(&slots), slow);
        let a2 = inflight.run("a", Some(&slots), slow);
        let b = inflight.run("b", Some(&slots), slow);
        let (a, a2, b) = tokio::join!(a, a2, b);
        assert_eq!(a.unwrap(), 1);
        assert_eq!(a2.unwrap(), 1);
        assert!(matches!(b, Err(NotRun::Busy)));
    }
}
