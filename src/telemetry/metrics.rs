//! Prometheus metrics, served on the admin listener. Labels carry conn_ids,
//! API names and outcome words only; never a secret.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Registry,
    lookups: Family<Labels, HotCounter>,
    aws_calls: Family<Labels, Counter>,
    validation: Histogram,
    logins: Family<Labels, Counter>,
    secret_age: Family<Labels, Gauge<f64, AtomicU64>>,
    stale_serves: Counter,
    rotation_checks: Family<Labels, Counter>,
    prefetch: Family<Labels, Counter>,
    aws_last_success: Gauge<f64, AtomicU64>,
    prefetch_seconds: Gauge<f64, AtomicU64>,
    // Handles for the hot path, resolved once (no label hashing per request).
    cache_hit: HotCounter,
    cache_miss: HotCounter,
    connection_ok: HotCounter,
    connection_ok_unvalidated: HotCounter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sidecar");
        let lookups = Family::<Labels, HotCounter>::default();
        registry.register(
            "lookups",
            "Connection and variable lookups by kind and outcome",
            lookups.clone(),
        );
        let cache = Family::<Labels, HotCounter>::default();
        registry.register(
            "cache_requests",
            "Answer cache hits and misses",
            cache.clone(),
        );
        let aws_calls = Family::<Labels, Counter>::default();
        registry.register(
            "aws_calls",
            "AWS API calls by API and outcome",
            aws_calls.clone(),
        );
        let validation = Histogram::new([
            0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        registry.register(
            "validation_seconds",
            "Time of one Postgres login check",
            validation.clone(),
        );
        let logins = Family::<Labels, Counter>::default();
        registry.register(
            "validations",
            "Postgres login checks by outcome",
            logins.clone(),
        );
        let secret_age = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "secret_age_seconds",
            "Age of the secret value last served, per conn_id",
            secret_age.clone(),
        );
        let stale_serves = Counter::default();
        registry.register(
            "stale_serves",
            "Answers served from a cached credential while AWS failed",
            stale_serves.clone(),
        );
        let aws_last_success = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "aws_last_success_timestamp_seconds",
            "Unix time of the last AWS call that succeeded (ok or not_found); 0 before the first",
            aws_last_success.clone(),
        );
        let prefetch = Family::<Labels, Counter>::default();
        registry.register(
            "prefetch",
            "Start-up prefetch of connections, by outcome (ok, failed, skipped)",
            prefetch.clone(),
        );
        let prefetch_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "prefetch_duration_seconds",
            "How long the start-up prefetch took (0 until it is done)",
            prefetch_seconds.clone(),
        );
        let rotation_checks = Family::<Labels, Counter>::default();
        registry.register(
            "rotation_checks",
            "Rotation checks by verdict",
            rotation_checks.clone(),
        );
        let build = Family::<Labels, Gauge>::default();
        registry.register("build_info", "Build version", build.clone());
        build
            .get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_string())])
            .set(1);
        let cache_hit = cache
            .get_or_create(&vec![("result", "hit".to_string())])
            .clone();
        let cache_miss = cache
            .get_or_create(&vec![("result", "miss".to_string())])
            .clone();
        let connection_ok = lookups
            .get_or_create(&vec![
                ("kind", "connection".to_string()),
                ("outcome", "ok".to_string()),
                ("validated", "true".to_string()),
            ])
            .clone();
        let connection_ok_unvalidated = lookups
            .get_or_create(&vec![
                ("kind", "connection".to_string()),
                ("outcome", "ok".to_string()),
                ("validated", "false".to_string()),
            ])
            .clone();
        Metrics {
            cache_hit,
            cache_miss,
            connection_ok,
            connection_ok_unvalidated,
            registry,
            lookups,
            aws_calls,
            validation,
            logins,
            secret_age,
            stale_serves,
            rotation_checks,
            prefetch,
            prefetch_seconds,
            aws_last_success,
        }
    }

    /// One conn_id of the start-up prefetch done.
    pub fn prefetched(&self, outcome: &'static str) {
        self.prefetch
            .get_or_create(&vec![("outcome", outcome.to_string())])
            .inc();
    }

    pub fn prefetch_finished(&self, seconds: f64) {
        self.prefetch_seconds.set(seconds);
    }

    /// A lookup that did not serve a connection (an error, or a variable /
    /// config value: `validated` is "none").
    pub fn lookup(&self, kind: &'static str, outcome: &str) {
        self.lookups
            .get_or_create(&vec![
                ("kind", kind.to_string()),
                ("outcome", outcome.to_string()),
                ("validated", "none".to_string()),
            ])
            .inc();
    }

    /// A connection served, proven to log in or not.
    pub fn connection_served(&self, validated: bool) {
        if validated {
            self.connection_ok.inc();
        } else {
            self.connection_ok_unvalidated.inc();
        }
    }

    /// Cache misses so far (work that allocates and frees a lot).
    pub fn misses(&self) -> u64 {
        self.cache_miss.get()
    }

    pub fn cache(&self, hit: bool) {
        if hit {
            self.cache_hit.inc();
        } else {
            self.cache_miss.inc();
        }
    }

    pub fn aws_call(&self, api: &'static str, outcome: &str) {
        // An outage with backoff makes few calls; this gauge lets an alert
        // see "no success for N minutes" however sparse the tries are.
        if outcome == "ok" || outcome == "not_found" {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            self.aws_last_success.set(now);
        }
        self.aws_calls
            .get_or_create(&vec![
                ("api", api.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
    }

    pub fn validation(&self, seconds: f64, outcome: &'static str) {
        self.validation.observe(seconds);
        self.logins
            .get_or_create(&vec![("outcome", outcome.to_string())])
            .inc();
    }

    /// Replace the per-conn_id secret ages (called at scrape time, so the
    /// gauges are current and conn_ids that left the cache disappear).
    pub fn set_secret_ages(&self, ages: impl Iterator<Item = (String, f64)>) {
        self.secret_age.clear();
        for (conn_id, seconds) in ages {
            self.secret_age
                .get_or_create(&vec![("conn_id", conn_id)])
                .set(seconds);
        }
    }

    /// Forget the per-conn_id ages once rendered: they are computed afresh
    /// at every scrape, so keeping them would only hold memory per conn_id.
    pub fn clear_secret_ages(&self) {
        self.secret_age.clear();
    }

    pub fn stale_serve(&self) {
        self.stale_serves.inc();
    }

    pub fn rotation_check(&self, verdict: &str) {
        self.rotation_checks
            .get_or_create(&vec![("verdict", verdict.to_string())])
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// A counter for the hot path: one cache line per thread, summed when
/// scraped. A plain `Counter` is one atomic that every core writes on every
/// cache hit, so its cache line moves between cores on every request.
#[derive(Clone, Default, Debug)]
pub struct HotCounter(Arc<[Shard; SHARDS]>);

const SHARDS: usize = 8;

#[derive(Default, Debug)]
#[repr(align(128))] // a cache line pair of its own (adjacent-line prefetch)
struct Shard(AtomicU64);

impl HotCounter {
    pub fn inc(&self) {
        thread_local! {
            static SHARD: usize = {
                static NEXT: AtomicUsize = AtomicUsize::new(0);
                NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS
            };
        }
        let shard = SHARD.with(|s| *s);
        self.0[shard].0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
    }
}

impl TypedMetric for HotCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for HotCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_counters_sum_every_thread_and_render_as_counters() {
        let m = Metrics::new();
        // More threads than shards: some threads share one.
        std::thread::scope(|s| {
            for _ in 0..(SHARDS + 4) {
                s.spawn(|| {
                    for _ in 0..1000 {
                        m.cache(true);
                        m.connection_served(true);
                    }
                });
            }
        });
        m.cache(false);
        m.lookup("connection", "not_found");
        let text = m.render();
        let hits = format!(
            "sidecar_cache_requests_total{{result=\"hit\"}} {}",
            (SHARDS + 4) * 1000
        );
        assert!(text.contains(&hits), "{text}");
        assert!(
            text.contains("sidecar_cache_requests_total{result=\"miss\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE sidecar_cache_requests counter"),
            "{text}"
        );
        let served = format!(
            "sidecar_lookups_total{{kind=\"connection\",outcome=\"ok\",validated=\"true\"}} {}",
            (SHARDS + 4) * 1000
        );
        assert!(text.contains(&served), "{text}");
        assert!(
            text.contains("outcome=\"not_found\",validated=\"none\"} 1\n"),
            "{text}"
        );
        assert_eq!(m.misses(), 1);
    }
}
