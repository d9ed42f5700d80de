//! Failure modes (issue 12), through the real HTTP API of the real binary.
