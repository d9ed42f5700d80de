//! What the sidecar tells its operator: Prometheus metrics ([`metrics`]).

pub mod metrics;
