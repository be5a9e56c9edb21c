//! Fails the build when the system libcurl cannot be found: gix's https transport links it, and
//! without it curl-sys quietly builds a libcurl without TLS, so https Git sources would fail
//! only at run time ("Curl operation failed: [48] An unknown option was passed in to libcurl").
//! `OUTPOST_ALLOW_CURL_WITHOUT_PKG_CONFIG=1` skips the check (a libcurl found another way).
//! Also names the Git commit for `outpost-hub --version`.

use std::process::Command;

fn main() {
    git_commit();
    println!("cargo:rerun-if-env-changed=OUTPOST_ALLOW_CURL_WITHOUT_PKG_CONFIG");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_LIBDIR");
    if std::env::var_os("OUTPOST_ALLOW_CURL_WITHOUT_PKG_CONFIG").is_some() {
        return;
    }
    let found = Command::new("pkg-config")
        .args(["--exists", "libcurl"])
        .status()
        .is_ok_and(|status| status.success());
    if !found {
        eprintln!(
            "error: the system libcurl was not found (pkg-config --exists libcurl failed).\n\
             Without it the hub's https Git transport would be built without TLS.\n\
             Install it: apt-get install pkg-config libcurl4-openssl-dev libssl-dev\n\
             (bash scripts/setup.sh does), then `cargo clean -p curl-sys` and build again.\n\
             A libcurl found without pkg-config: set OUTPOST_ALLOW_CURL_WITHOUT_PKG_CONFIG=1."
        );
        std::process::exit(1);
    }
}

// `git_commit()`: shared with the agent's build script.
include!("../build/git_commit.rs");
