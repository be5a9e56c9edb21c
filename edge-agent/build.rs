//! Names the Git commit the agent is built from, for `outpost-agent --version`.

fn main() {
    git_commit();
}

// `git_commit()`: shared with the hub's build script.
include!("../build/git_commit.rs");
