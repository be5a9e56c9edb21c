//! Home of Outpost's end-to-end tests: real hub and agent processes, real Git repositories served
//! by `git daemon`, real QUIC on loopback, and the project's Kubernetes API test server. They
//! arrive with the hub, transport and agent issues; the binaries' own CLI tests live beside them
//! (`hub/tests`, `simulations/tests`) until then.
