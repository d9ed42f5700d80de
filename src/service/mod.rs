//! The sidecar's per-key service over the pipeline: one state per key
//! ([`state`]: the states and the pure transition function; [`keys`]: where
//! they are kept and changed, atomically per key), single-flight,
//! stale-if-error and bounds ([`resolver`], its single-flight in
//! [`inflight`]), refresh-ahead ([`refresh`]),
//! start-up prefetch ([`prefetch`]), rotation checks ([`rotation`]),
//! variables and config options ([`variables`]).

pub mod inflight;
pub mod keys;
pub mod prefetch;
pub mod refresh;
pub mod resolver;
pub mod rotation;
pub mod state;
pub mod variables;
