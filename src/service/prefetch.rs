//! Start-up prefetch: a freshly started pod (every KubernetesExecutor task,
//! every rollout) should not make its first task wait on AWS and a login.
//!
//! In the background, once the listeners are up, these conn_ids are
//! resolved exactly as a lookup resolves them ([`Resolver::connection`]:
//! the same pipeline, single-flight with any request for the same id, the
//! same answers cache):
//!
//! 1. every `[connections.*]` entry (`prefetch_entries`, on by default);
//! 2. the `prefetch` list;
//! 3. with `prefetch_all = N`, up to N secrets found under
//!    `connections_prefix` by `ListSecrets` (a name-prefix filter, 100 names
//!    per call; needs `secretsmanager:ListSecrets`).
//!
//! With `prefetch_batch`, their values are first fetched 20 per
//! `BatchGetSecretValue` call and put where `GetSecretValue`'s go (stage
//! AWSCURRENT), so the pipeline then makes no `GetSecretValue`; the logins
//! still happen one per connection (that is the product).
//!
//! At most `prefetch_concurrency` conn_ids resolve at once. Readiness never
//! waits for any of it: an AWS outage at start must not keep an Airflow pod
//! out of its Service. A failure is logged per conn_id (its code and cause,
//! never a value) and does not stop the others; one INFO line sums it up.
//! A prefetched answer is not marked "used", so refresh-ahead keeps only
//! the ones Airflow actually asks for warm.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::aws::secrets_manager::{Stage, BATCH_MAX};
use crate::cache::ConnKey;
use crate::pipeline::map;
use crate::service::resolver::Resolver;

/// What one prefetch did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Conn_ids resolved and cached.
    pub ok: usize,
    /// Conn_ids whose resolution failed (each logged with its cause).
    pub failed: usize,
    /// Already answered (a request got there first): left alone.
    pub skipped: usize,
    pub list_calls: u32,
    pub batch_calls: u32,
    /// Versions the batch calls put in the secrets cache.
    pub batch_cached: usize,
    pub elapsed: Duration,
}

/// How one conn_id's prefetch ended.
enum Outcome {
    Ok,
    Failed,
    Skipped,
}

/// Start the prefetch in the background, if there is anything to prefetch.
pub fn spawn(resolver: Arc<Resolver>) -> Option<tokio::task::JoinHandle<Summary>> {
    let s = &resolver.settings;
    let anything = (s.prefetch_entries && !s.connections.is_empty())
        || !s.prefetch.is_empty()
        || s.prefetch_all > 0;
    anything.then(|| tokio::spawn(async move { resolver.prefetch().await }))
}

/// The conn_id a secret name under `prefix/` stands for, as seen by this
/// sidecar: with a pinned team, `<team>--<id>` and `<id>` are the team's
/// `<id>`, other teams' secrets are not ours; without one, the name is the id.
fn conn_id_of(rest: &str, team: Option<&str>) -> Option<String> {
    let id = match team {
        Some(team) => match rest.split_once("--") {
            Some((t, id)) if t == team => id,
            Some(_) => return None,
            None => rest,
        },
        None => rest,
    };
    crate::config::is_valid_id(id).then(|| id.to_string())
}

impl Resolver {
    /// Resolve every conn_id the settings name for prefetch (see the module
    /// docs); returns when all have finished.
    pub async fn prefetch(self: &Arc<Self>) -> Summary {
        let started = Instant::now();
        let s = self.settings.clone();
        let mut summary = Summary::default();

        let mut ids: Vec<String> = Vec::new();
        if s.prefetch_entries {
            ids.extend(s.connections.keys().cloned());
        }
        ids.extend(s.prefetch.iter().cloned());
        if s.prefetch_all > 0 {
            let prefix = format!("{}/", s.connections_prefix);
            let (names, calls, failed) = self
                .pipeline
                .aws
                .list_names(&prefix, s.prefetch_all as usize)
                .await;
            summary.list_calls = calls;
            if let Some(e) = failed {
                tracing::warn!(error = e.code.as_str(), cause = %e.message,
                    "prefetch_all: ListSecrets failed (the role needs secretsmanager:ListSecrets); prefetching the named connections only");
            }
            ids.extend(
                names
                    .iter()
                    .filter_map(|n| conn_id_of(&n[prefix.len()..], s.team.as_deref())),
            );
        }
        let mut seen = HashSet::new();
        ids.retain(|id| seen.insert(id.clone()));
        // (conn_id, cache key): the key's parts are the front's business.
        let keys: Vec<(String, ConnKey)> = ids
            .into_iter()
            .filter_map(|id| match self.key(None, &id) {
                Ok(key) => Some((id, key)),
                Err(e) => {
                    tracing::warn!(conn_id = %id, error = e.code.as_str(), cause = %e.message, "not prefetched");
                    None
                }
            })
            .collect();
        tracing::info!(
            connections = keys.len(),
            concurrency = s.prefetch_concurrency,
            batch = s.prefetch_batch,
            "prefetch started"
        );

        if s.prefetch_batch {
            self.prefetch_values(&keys, &mut summary).await;
        }

        let slots = Arc::new(Semaphore::new(s.prefetch_concurrency));
        let mut running = JoinSet::new();
        for (_, key) in keys {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            let this = self.clone();
            running.spawn(async move {
                let outcome = this.prefetch_one(&key).await;
                drop(slot);
                outcome
            });
        }
        while let Some(done) = running.join_next().await {
            let word = match done {
                Ok(Outcome::Ok) => {
                    summary.ok += 1;
                    "ok"
                }
                Ok(Outcome::Skipped) => {
                    summary.skipped += 1;
                    "skipped"
                }
                Ok(Outcome::Failed) | Err(_) => {
                    summary.failed += 1;
                    "failed"
                }
            };
            self.metrics.prefetched(word);
        }
        summary.elapsed = started.elapsed();
        self.metrics
            .prefetch_finished(summary.elapsed.as_secs_f64());
        tracing::info!(
            ok = summary.ok,
            failed = summary.failed,
            skipped = summary.skipped,
            list_calls = summary.list_calls,
            batch_calls = summary.batch_calls,
            batch_cached = summary.batch_cached,
            elapsed_ms = summary.elapsed.as_millis() as u64,
            "prefetch finished"
        );
        summary
    }

    /// One conn_id, as a lookup would resolve it. An id already answered is
    /// left alone: reading it would mark it used for refresh-ahead.
    async fn prefetch_one(self: &Arc<Self>, key: &ConnKey) -> Outcome {
        let now = std::time::Instant::now();
        let answered = self.connections.get(key.as_str());
        if answered.is_some_and(|e| e.state.answer(now).is_some()) {
            return Outcome::Skipped;
        }
        match self.connection(key, false).await {
            Ok(served) => {
                tracing::debug!(conn_id = %key, stage = %served.stage, validated = served.validated(), "prefetched");
                Outcome::Ok
            }
            Err(e) => {
                tracing::warn!(conn_id = %key, error = e.code.as_str(), cause = %e.message, "prefetch failed");
                Outcome::Failed
            }
        }
    }

    /// `prefetch_batch`: the AWSCURRENT values of the keys' secrets, 20 per
    /// `BatchGetSecretValue`, into the secrets cache. A secret AWS says does
    /// not exist is cached as absent, as `GetSecretValue`'s answer would be;
    /// any other per-secret error is left to the pipeline (it fetches and
    /// reports it). If a call fails (no `secretsmanager:BatchGetSecretValue`,
    /// throttling: its quota is 100 per second), the rest go one by one.
    async fn prefetch_values(&self, keys: &[(String, ConnKey)], summary: &mut Summary) {
        let s = &self.settings;
        let aws = &self.pipeline.aws;
        let mut wanted: Vec<String> = Vec::new();
        for (conn_id, key) in keys {
            match s.connections.get(conn_id) {
                Some(entry) => match &entry.secret_id {
                    Some(id) => wanted.push(id.clone()),
                    // The RDS-managed secret's ARN comes from DescribeDB*: left to the pipeline.
                    None if entry.db_instance.is_some() || entry.db_cluster.is_some() => {}
                    None => wanted.extend(map::candidates(|id| s.connection_secret_id(id), key)),
                },
                None => {
                    if s.lookup_pattern
                        .as_ref()
                        .is_some_and(|p| !p.is_match(conn_id))
                    {
                        continue;
                    }
                    wanted.extend(map::candidates(|id| s.connection_secret_id(id), key));
                }
            }
        }
        let mut seen = HashSet::new();
        wanted.retain(|id| seen.insert(id.clone()));
        for chunk in wanted.chunks(BATCH_MAX) {
            summary.batch_calls += 1;
            let batch = match aws.batch_get(chunk).await {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::warn!(error = e.code.as_str(), cause = %e.message,
                        "prefetch_batch: BatchGetSecretValue failed (the role needs secretsmanager:BatchGetSecretValue); fetching the rest one by one");
                    return;
                }
            };
            for (name, version) in &batch.found {
                // The call takes no stage; cache only what AWS says is AWSCURRENT.
                if !Stage::Current.is_in(&version.stages) {
                    continue;
                }
                for id in chunk.iter().filter(|id| *id == name || **id == version.arn) {
                    if aws.seed(id, Stage::Current, Some(version.clone())) {
                        summary.batch_cached += 1;
                    }
                }
            }
            for (id, code) in &batch.errors {
                if code == "ResourceNotFoundException" && chunk.contains(id) {
                    aws.seed(id, Stage::Current, None);
                } else {
                    tracing::debug!(secret_id = %id, error = %code, "prefetch_batch: not fetched in the batch; the pipeline will fetch it");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_names_map_to_this_sidecars_conn_ids() {
        assert_eq!(conn_id_of("db1", None).as_deref(), Some("db1"));
        assert_eq!(conn_id_of("a--b", None).as_deref(), Some("a--b"));
        assert_eq!(conn_id_of("nested/x", None), None);
        assert_eq!(conn_id_of("", None), None);
        assert_eq!(conn_id_of("db1", Some("t")).as_deref(), Some("db1"));
        assert_eq!(conn_id_of("t--db1", Some("t")).as_deref(), Some("db1"));
        assert_eq!(conn_id_of("other--db1", Some("t")), None);
    }
}
