//! Compressed payloads (whole bodies and deltas), computed once and shared: ten thousand agents
//! asking for the same step cost one compression. Concurrent requests for a payload being
//! computed wait for that computation instead of starting their own. Bounded by bytes, oldest out.
//!
//! Compression is deterministic (same zstd, level and inputs → same bytes), so a payload evicted
//! and computed again has the same digest, and an agent's resume offset still applies.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use outpost_proto::Digest;
use outpost_proto::compress::{self, CompressError};
use outpost_proto::wire::PayloadEncoding;
use tokio::sync::OnceCell;

/// One encoding of one snapshot body.
#[derive(Debug)]
pub struct Payload {
    /// Whole or delta (against which body).
    pub encoding: PayloadEncoding,
    /// The compressed bytes.
    pub bytes: Vec<u8>,
    /// Their SHA-256.
    pub digest: Digest,
}

type Key = (Digest, Option<Digest>);
type Slot = Arc<OnceCell<Arc<Payload>>>;

/// The cache.
#[derive(Debug)]
pub struct PayloadCache {
    level: i32,
    max_bytes: usize,
    compressions: AtomicU64,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    slots: HashMap<Key, Slot>,
    order: VecDeque<Key>,
    bytes: usize,
}

/// A payload could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// Reading the bodies failed.
    #[error("reading snapshot bodies: {0}")]
    Load(String),
    /// zstd failed.
    #[error(transparent)]
    Compress(#[from] CompressError),
    /// The compression task died.
    #[error("compression task failed: {0}")]
    Task(String),
}

/// The bodies a payload is made from.
#[derive(Debug)]
pub struct Bodies {
    /// The body to send.
    pub target: Vec<u8>,
    /// The body the agent holds, for a delta.
    pub base: Option<Vec<u8>>,
}

impl PayloadCache {
    /// A cache compressing at zstd `level`, holding at most `max_bytes` of payloads.
    pub fn new(level: i32, max_bytes: usize) -> PayloadCache {
        PayloadCache {
            level,
            max_bytes,
            compressions: AtomicU64::new(0),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Compressions run so far (cache misses).
    pub fn compressions(&self) -> u64 {
        self.compressions.load(Ordering::Relaxed)
    }

    /// The payload of `target` (as a delta against `base` when given), computed on a miss from
    /// the bodies `load` returns (called only then, on a blocking thread). With it, how long
    /// this call spent compressing (none: a hit, or another call's compression waited for).
    pub async fn get(
        &self,
        target: Digest,
        base: Option<Digest>,
        load: impl FnOnce() -> Result<Bodies, String> + Send + 'static,
    ) -> Result<(Arc<Payload>, Option<std::time::Duration>), PayloadError> {
        let key = (target, base);
        let slot = {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            inner.slots.entry(key).or_default().clone()
        };
        let level = self.level;
        let mut compressed = None;
        let payload = slot
            .get_or_try_init(|| async {
                self.compressions.fetch_add(1, Ordering::Relaxed);
                let started = std::time::Instant::now();
                let payload = tokio::task::spawn_blocking(move || compute(level, base, load))
                    .await
                    .map_err(|error| PayloadError::Task(error.to_string()))?;
                compressed = Some(started.elapsed());
                payload
            })
            .await?
            .clone();
        self.account(key, payload.bytes.len());
        Ok((payload, compressed))
    }

    fn account(&self, key: Key, size: usize) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.order.contains(&key) {
            return;
        }
        inner.order.push_back(key);
        inner.bytes += size;
        while inner.bytes > self.max_bytes && inner.order.len() > 1 {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            if let Some(slot) = inner.slots.remove(&oldest) {
                inner.bytes -= slot.get().map_or(0, |payload| payload.bytes.len());
            }
        }
    }
}

fn compute(
    level: i32,
    base: Option<Digest>,
    load: impl FnOnce() -> Result<Bodies, String>,
) -> Result<Arc<Payload>, PayloadError> {
    let bodies = load().map_err(PayloadError::Load)?;
    let (encoding, bytes) = match (base, &bodies.base) {
        (Some(base), Some(reference)) => (
            PayloadEncoding::Delta { base },
            compress::compress_delta(reference, &bodies.target, level)?,
        ),
        _ => (
            PayloadEncoding::Whole,
            compress::compress_whole(&bodies.target, level)?,
        ),
    };
    Ok(Arc::new(Payload {
        encoding,
        digest: Digest::of(&bytes),
        bytes,
    }))
}
