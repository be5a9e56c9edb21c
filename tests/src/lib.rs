//! Outpost's end-to-end test kit and tests: an in-process fleet over real QUIC and SQLite
//! ([`harness`]), a seeded lossy UDP link ([`lossy`]), and tests with real processes. The
//! binaries' own CLI tests live beside them (`hub/tests`, `simulations/tests`).

pub mod abuse;
pub mod harness;
pub mod kubeapi;
pub mod lossy;
pub mod processes;
