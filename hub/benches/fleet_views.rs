//! What the fleet page asks of the store at fleet scale: the summary (counts by phase, release
//! and label) and one filtered page, over 100,000 agents in a real SQLite file.
//!
//! `cargo bench -p outpost-hub --bench fleet_views` (`OUTPOST_BENCH_AGENTS` to change the count).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use outpost_hub::store::{
    AssignmentChange, FleetFilter, FleetStore, FleetView, SqliteStore, StatusWrite, Store,
};
use outpost_proto::Digest;
use outpost_proto::wire::{BundleStatus, Phase};

fn main() {
    let agents: usize = std::env::var("OUTPOST_BENCH_AGENTS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(100_000);
    let dir = tempfile::tempdir().expect("temp dir");
    // OUTPOST_BENCH_DB keeps the file for a look with sqlite3 afterwards.
    let path = std::env::var_os("OUTPOST_BENCH_DB")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| dir.path().join("hub.db"));
    let store = Arc::new(SqliteStore::open(&path).expect("store"));
    let started = Instant::now();
    let regions = ["eu", "us", "ap", "sa", "af"];
    let mut tokens = Vec::new();
    for (index, region) in regions.iter().enumerate() {
        let digests: Vec<Digest> = (0..agents / regions.len())
            .map(|n| Digest::of(format!("token-{index}-{n}").as_bytes()))
            .collect();
        let mut labels = BTreeMap::new();
        labels.insert("region".to_owned(), (*region).to_owned());
        labels.insert("role".to_owned(), "store".to_owned());
        store
            .create_tokens(&digests, &labels, "bench", 0, i64::MAX)
            .expect("tokens");
        tokens.extend(digests);
    }
    // Enrol from several threads: the writer commits them in groups.
    let chunks: Vec<Vec<Digest>> = tokens
        .chunks(tokens.len().div_ceil(16))
        .map(<[Digest]>::to_vec)
        .collect();
    let ids: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                let store = store.clone();
                scope.spawn(move || {
                    chunk
                        .iter()
                        .map(|token| {
                            let key = Digest::of(&token.0).0;
                            store
                                .enrol(token, &key, 1)
                                .expect("enrol")
                                .expect("token")
                                .id
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|handle| handle.join().expect("thread"))
            .collect()
    });
    let (v1, v2) = (Digest::of(b"v1"), Digest::of(b"v2"));
    let changes: Vec<AssignmentChange> = ids
        .iter()
        .enumerate()
        .map(|(index, agent)| AssignmentChange {
            agent: agent.clone(),
            bundle: "shop".to_owned(),
            to: Some(if index % 10 == 0 { (2, v2) } else { (1, v1) }),
            origin: "track:repo".to_owned(),
        })
        .collect();
    store.change_assignments(&changes, 2).expect("assign");
    let reports: Vec<StatusWrite> = ids
        .iter()
        .enumerate()
        .map(|(index, agent)| StatusWrite {
            agent: agent.clone(),
            sequence: 1,
            bundles: vec![BundleStatus {
                bundle: "shop".to_owned(),
                digest: if index % 10 == 0 { v2 } else { v1 },
                generation: 1,
                phase: if index % 50 == 0 {
                    Phase::Failed
                } else {
                    Phase::Healthy
                },
                objects_total: 40,
                objects_ready: 40,
                message: String::new(),
                observed_at: 3,
                stale: false,
            }],
            drift: Vec::new(),
            now: 3,
        })
        .collect();
    store.record_statuses(&reports).expect("reports");
    println!(
        "fleet_views: {} agents made in {:.1} s",
        ids.len(),
        started.elapsed().as_secs_f64()
    );
    let time = |what: &str, runs: u32, mut work: Box<dyn FnMut() -> usize + '_>| {
        let mut seen = 0;
        let started = Instant::now();
        for _ in 0..runs {
            seen = work();
        }
        println!(
            "fleet_views: {what}: {:.1} ms ({seen} rows)",
            started.elapsed().as_secs_f64() * 1000.0 / f64::from(runs)
        );
    };
    time(
        "summary",
        5,
        Box::new(|| {
            let summary = store.fleet_summary().expect("summary");
            summary.phases.len() + summary.assigned.len() + summary.labels.len()
        }),
    );
    time(
        "first page of 100, no filter",
        5,
        Box::new(|| {
            store
                .fleet_page(&FleetFilter::default(), None, 100)
                .expect("page")
                .ids
                .len()
        }),
    );
    let failed = FleetFilter {
        bundle: Some("shop".to_owned()),
        phase: Some("Failed".to_owned()),
        labels: vec![("region".to_owned(), "eu".to_owned())],
        ..FleetFilter::default()
    };
    time(
        "first page of 100, region=eu and Failed",
        5,
        Box::new(|| store.fleet_page(&failed, None, 100).expect("page").matched as usize),
    );
    let middle = ids[ids.len() / 2].clone();
    time(
        "a page of 100 in the middle",
        5,
        Box::new(|| {
            store
                .fleet_page(&FleetFilter::default(), Some(&middle), 100)
                .expect("page")
                .ids
                .len()
        }),
    );
    let page: Vec<String> = ids.iter().take(100).cloned().collect();
    time(
        "details of 100",
        5,
        Box::new(|| store.fleet_details(&page).expect("details").agents.len()),
    );
    time(
        "every id (the connected filter's path)",
        3,
        Box::new(|| store.fleet_ids(&FleetFilter::default()).expect("ids").len()),
    );
    time(
        "releases",
        5,
        Box::new(|| store.releases().expect("releases").len()),
    );
}
