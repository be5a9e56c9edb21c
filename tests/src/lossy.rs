//! A lossy link for tests and simulations: an in-process UDP relay between agents and the hub
//! that drops, delays, jitters (and so reorders), duplicates, caps bandwidth and blacks out on a
//! schedule, seeded for repeatability. Agents dial the relay's address instead of the hub's.
//!
//! Each direction is a queue: a packet waits until the link is free (bandwidth), then travels
//! for the delay plus jitter. A packet that would wait longer than `queue_limit` is dropped
//! (tail drop, like a router's buffer). Blackouts and duplication apply on entry; random loss
//! applies after the packet has used the link.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::time::Instant;

/// One direction's impairments.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkProfile {
    /// Probability that a packet is dropped (0.0–1.0).
    pub loss: f64,
    /// One-way delay.
    pub delay: Duration,
    /// Extra delay drawn uniformly from 0..jitter per packet (reorders packets).
    pub jitter: Duration,
    /// Probability that a packet is delivered twice.
    pub duplicate: f64,
    /// Link rate in bits per second; `None` is unlimited.
    pub bandwidth_bps: Option<u64>,
    /// Longest a packet may queue for the link before it is dropped.
    pub queue_limit: Duration,
    /// Windows (start, length) after the relay starts in which every packet is dropped.
    pub blackouts: Vec<(Duration, Duration)>,
}

impl Default for LinkProfile {
    fn default() -> LinkProfile {
        LinkProfile {
            loss: 0.0,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            duplicate: 0.0,
            bandwidth_bps: None,
            queue_limit: Duration::from_millis(500),
            blackouts: Vec::new(),
        }
    }
}

impl LinkProfile {
    /// A link with `loss` and a round trip of `rtt` (half each way).
    pub fn lossy(loss: f64, rtt: Duration) -> LinkProfile {
        LinkProfile {
            loss,
            delay: rtt / 2,
            ..LinkProfile::default()
        }
    }
}

/// Packet and byte counts, per direction.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Packets agent → hub that arrived at the relay.
    pub up_packets: AtomicU64,
    /// Packets hub → agent that arrived at the relay.
    pub down_packets: AtomicU64,
    /// Bytes hub → agent delivered.
    pub down_bytes_delivered: AtomicU64,
    /// Packets dropped (loss, queue, blackout), both ways.
    pub dropped: AtomicU64,
}

/// A running relay. Dropping it stops it.
#[derive(Debug)]
pub struct Relay {
    address: SocketAddr,
    stats: Arc<RelayStats>,
    blackout: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// splitmix64.
#[derive(Debug)]
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn chance(&mut self, probability: f64) -> bool {
        probability > 0.0 && (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= probability
    }

    fn below(&mut self, limit: Duration) -> Duration {
        match limit.as_nanos() as u64 {
            0 => Duration::ZERO,
            nanos => Duration::from_nanos(self.next() % nanos),
        }
    }
}

/// One direction of the link: its profile, clock and queue state.
#[derive(Debug)]
struct Direction {
    profile: LinkProfile,
    random: Random,
    busy_until: Instant,
    started: Instant,
}

impl Direction {
    /// When `size` bytes entering now arrive (twice if duplicated); empty if dropped. A packet
    /// lost to `loss` has still used the link (as on a radio link), so goodput is bounded by
    /// capacity × (1 − loss); a packet that finds the queue full never enters it.
    fn admit(&mut self, size: usize, manual_blackout: bool) -> Vec<Instant> {
        let now = Instant::now();
        let since = now - self.started;
        let blacked_out = manual_blackout
            || self
                .profile
                .blackouts
                .iter()
                .any(|(start, length)| since >= *start && since < *start + *length);
        if blacked_out {
            return Vec::new();
        }
        let copies = 1 + usize::from(self.random.chance(self.profile.duplicate));
        let mut arrivals = Vec::new();
        for _ in 0..copies {
            let departure = match self.profile.bandwidth_bps {
                Some(bps) => {
                    let start = self.busy_until.max(now);
                    if start - now > self.profile.queue_limit {
                        break;
                    }
                    let serialisation = Duration::from_nanos(size as u64 * 8 * 1_000_000_000 / bps);
                    self.busy_until = start + serialisation;
                    self.busy_until
                }
                None => now,
            };
            if self.random.chance(self.profile.loss) {
                continue;
            }
            arrivals.push(departure + self.profile.delay + self.random.below(self.profile.jitter));
        }
        arrivals
    }
}

impl Relay {
    /// Starts a relay on loopback towards `upstream`, with `up` (agent → hub) and `down`
    /// (hub → agent) impairments, seeded.
    pub async fn start(
        upstream: SocketAddr,
        up: LinkProfile,
        down: LinkProfile,
        seed: u64,
    ) -> std::io::Result<Relay> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let address = front.local_addr()?;
        let stats = Arc::new(RelayStats::default());
        let blackout = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let up = Arc::new(Mutex::new(Direction {
            profile: up,
            random: Random(seed),
            busy_until: started,
            started,
        }));
        let down = Arc::new(Mutex::new(Direction {
            profile: down,
            random: Random(seed ^ 0xD0D0),
            busy_until: started,
            started,
        }));
        let task = tokio::spawn(run(
            front,
            upstream,
            up,
            down,
            stats.clone(),
            blackout.clone(),
        ));
        Ok(Relay {
            address,
            stats,
            blackout,
            task,
        })
    }

    /// Where agents should send.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Counters.
    pub fn stats(&self) -> &RelayStats {
        &self.stats
    }

    /// Drops everything both ways while `on`.
    pub fn set_blackout(&self, on: bool) {
        self.blackout.store(on, Ordering::Relaxed);
    }
}

fn deliver(socket: Arc<UdpSocket>, to: SocketAddr, packet: Vec<u8>, at: Instant) {
    tokio::spawn(async move {
        tokio::time::sleep_until(at).await;
        let _ = socket.send_to(&packet, to).await;
    });
}

async fn run(
    front: Arc<UdpSocket>,
    upstream: SocketAddr,
    up: Arc<Mutex<Direction>>,
    down: Arc<Mutex<Direction>>,
    stats: Arc<RelayStats>,
    blackout: Arc<AtomicBool>,
) {
    // One upstream socket per agent address, so the hub sees each agent as its own peer.
    let mut backs: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buffer = vec![0u8; 65_536];
    loop {
        let Ok((size, from)) = front.recv_from(&mut buffer).await else {
            return;
        };
        stats.up_packets.fetch_add(1, Ordering::Relaxed);
        let back = match backs.get(&from) {
            Some(back) => back.clone(),
            None => {
                let Ok(back) = UdpSocket::bind("127.0.0.1:0").await else {
                    continue;
                };
                let back = Arc::new(back);
                backs.insert(from, back.clone());
                tokio::spawn(pump_down(
                    back.clone(),
                    front.clone(),
                    from,
                    down.clone(),
                    stats.clone(),
                    blackout.clone(),
                ));
                back
            }
        };
        let arrivals = up
            .lock()
            .map(|mut up| up.admit(size, blackout.load(Ordering::Relaxed)))
            .unwrap_or_default();
        if arrivals.is_empty() {
            stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
        for at in arrivals {
            deliver(back.clone(), upstream, buffer[..size].to_vec(), at);
        }
    }
}

async fn pump_down(
    back: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    agent: SocketAddr,
    down: Arc<Mutex<Direction>>,
    stats: Arc<RelayStats>,
    blackout: Arc<AtomicBool>,
) {
    let mut buffer = vec![0u8; 65_536];
    loop {
        let Ok((size, _)) = back.recv_from(&mut buffer).await else {
            return;
        };
        stats.down_packets.fetch_add(1, Ordering::Relaxed);
        let arrivals = down
            .lock()
            .map(|mut down| down.admit(size, blackout.load(Ordering::Relaxed)))
            .unwrap_or_default();
        if arrivals.is_empty() {
            stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
        for at in arrivals {
            stats
                .down_bytes_delivered
                .fetch_add(size as u64, Ordering::Relaxed);
            deliver(front.clone(), agent, buffer[..size].to_vec(), at);
        }
    }
}
