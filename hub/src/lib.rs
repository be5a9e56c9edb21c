//! The hub's library: Git sources, bundle definitions, rendering into signed snapshots, the
//! store, the agent service, the admin API, and [`runtime::Hub`], which runs them all. The
//! binary (`main.rs`) is a thin shell over it; the simulator and the tests run the same
//! runtime.

pub mod api;
pub mod assign;
pub mod bundles;
pub mod changes;
pub mod config;
pub mod diff;
pub mod files;
pub mod git;
pub mod history;
pub mod keys;
pub mod kustomize;
pub mod limits;
pub mod metrics;
pub mod notify;
pub mod replication;
pub mod resign;
pub mod rollout;
pub mod runtime;
pub mod signed;
pub mod store;
pub mod sync;
pub mod transport;
pub mod udp;
pub mod variants;
