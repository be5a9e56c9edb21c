//! An in-memory UDP network for quinn on tokio's clock: every socket is an
//! [`quinn::AsyncUdpSocket`] whose datagrams go through one seeded delivery queue. Each agent's
//! socket has a [`Link`]: loss, round-trip time, a bandwidth cap per direction with a bounded
//! queue (tail drop), and outage windows. With tokio's clock paused, delays are virtual: hours of
//! fleet life pass in seconds, and the same seed gives the same losses.

use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use quinn::udp::{RecvMeta, Transmit};
use tokio::sync::Notify;
use tokio::time::Instant;

/// How an agent's link behaves (the hub's side is a perfect datacenter link).
#[derive(Debug, Clone, PartialEq)]
pub struct Link {
    /// Probability that a datagram is lost, each way.
    pub loss: f64,
    /// Round-trip time.
    pub rtt: Duration,
    /// Bits per second each way (0: unlimited).
    pub bandwidth: u64,
    /// Longest queue in front of the bandwidth cap; datagrams beyond it are dropped.
    pub queue: Duration,
    /// Windows (from the start of the simulation) during which nothing gets through.
    pub outages: Vec<(Duration, Duration)>,
}

impl Default for Link {
    fn default() -> Link {
        Link {
            loss: 0.0,
            rtt: Duration::from_millis(40),
            bandwidth: 0,
            queue: Duration::from_millis(500),
            outages: Vec::new(),
        }
    }
}

/// Bytes a socket sent and received (UDP payloads, so QUIC and TLS overhead included).
#[derive(Debug, Default)]
pub struct Traffic {
    /// Sent.
    pub sent: AtomicU64,
    /// Received.
    pub received: AtomicU64,
    /// Dropped on the way out (loss, outage, full queue).
    pub dropped: AtomicU64,
}

impl Traffic {
    /// Sent and received.
    pub fn total(&self) -> u64 {
        self.sent.load(Ordering::Relaxed) + self.received.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
struct Datagram {
    at: Instant,
    order: u64,
    from: SocketAddr,
    to: SocketAddr,
    bytes: Vec<u8>,
}

impl PartialEq for Datagram {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.order) == (other.at, other.order)
    }
}
impl Eq for Datagram {}
impl PartialOrd for Datagram {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Datagram {
    /// Reversed: the heap pops the earliest delivery first.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.order).cmp(&(self.at, self.order))
    }
}

#[derive(Debug, Default)]
struct Inbox {
    queue: VecDeque<(SocketAddr, Vec<u8>)>,
    waker: Option<Waker>,
}

#[derive(Debug)]
struct Port {
    link: Option<Arc<Link>>,
    inbox: Mutex<Inbox>,
    traffic: Arc<Traffic>,
    /// When each direction's bandwidth cap is free again: (up, down).
    busy: Mutex<(Instant, Instant)>,
}

#[derive(Debug)]
struct State {
    ports: HashMap<SocketAddr, Arc<Port>>,
    in_flight: BinaryHeap<Datagram>,
    order: u64,
    random: u64,
}

/// The network: sockets by address, and datagrams in flight.
#[derive(Debug)]
pub struct Network {
    state: Mutex<State>,
    start: Instant,
    wake: Notify,
}

fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Network {
    /// A network whose losses follow `seed`; start [`Network::deliver`] on the runtime.
    pub fn new(seed: u64) -> Arc<Network> {
        Arc::new(Network {
            state: Mutex::new(State {
                ports: HashMap::new(),
                in_flight: BinaryHeap::new(),
                order: 0,
                random: seed,
            }),
            start: Instant::now(),
            wake: Notify::new(),
        })
    }

    /// A socket at `address`: `link` for an agent, `None` for the hub.
    pub fn socket(self: &Arc<Network>, address: SocketAddr, link: Option<Link>) -> Arc<Socket> {
        let port = Arc::new(Port {
            link: link.map(Arc::new),
            inbox: Mutex::new(Inbox::default()),
            traffic: Arc::new(Traffic::default()),
            busy: Mutex::new((Instant::now(), Instant::now())),
        });
        self.lock().ports.insert(address, port.clone());
        Arc::new(Socket {
            network: self.clone(),
            address,
            port,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Delivers datagrams when they are due; runs until the runtime stops.
    pub async fn deliver(self: Arc<Network>) {
        loop {
            let next = {
                let mut state = self.lock();
                let now = Instant::now();
                while state
                    .in_flight
                    .peek()
                    .is_some_and(|datagram| datagram.at <= now)
                {
                    let Some(datagram) = state.in_flight.pop() else {
                        break;
                    };
                    if let Some(port) = state.ports.get(&datagram.to) {
                        port.traffic
                            .received
                            .fetch_add(datagram.bytes.len() as u64, Ordering::Relaxed);
                        let mut inbox = port.inbox.lock().unwrap_or_else(|p| p.into_inner());
                        inbox.queue.push_back((datagram.from, datagram.bytes));
                        if let Some(waker) = inbox.waker.take() {
                            waker.wake();
                        }
                    }
                }
                state.in_flight.peek().map(|datagram| datagram.at)
            };
            match next {
                Some(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = self.wake.notified() => {}
                    }
                }
                None => self.wake.notified().await,
            }
        }
    }

    fn send(&self, from: &Port, from_address: SocketAddr, to: SocketAddr, bytes: &[u8]) {
        let now = Instant::now();
        let since_start = now - self.start;
        let mut state = self.lock();
        let Some(to_port) = state.ports.get(&to).cloned() else {
            return;
        };
        // The agent's end decides how the link behaves; `up` is agent → hub.
        let (link, up) = match (&from.link, &to_port.link) {
            (Some(link), _) => (link.clone(), true),
            (None, Some(link)) => (link.clone(), false),
            (None, None) => (Arc::new(Link::default()), true),
        };
        let agent_port: &Port = if up { from } else { &to_port };
        from.traffic
            .sent
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let down = link
            .outages
            .iter()
            .any(|(start, end)| since_start >= *start && since_start < *end);
        let lost = link.loss > 0.0
            && (next_random(&mut state.random) as f64 / u64::MAX as f64) < link.loss;
        if down || lost {
            from.traffic.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut departs = now;
        let wire_nanos = (bytes.len() as u64 * 8 * 1_000_000_000).checked_div(link.bandwidth);
        if let Some(nanos) = wire_nanos {
            let mut busy = agent_port.busy.lock().unwrap_or_else(|p| p.into_inner());
            let free = if up { &mut busy.0 } else { &mut busy.1 };
            let start = (*free).max(now);
            if start - now > link.queue {
                from.traffic.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            *free = start + Duration::from_nanos(nanos);
            departs = *free;
        }
        let at = departs + link.rtt / 2;
        state.order += 1;
        let order = state.order;
        let earliest = state.in_flight.peek().is_none_or(|first| at < first.at);
        state.in_flight.push(Datagram {
            at,
            order,
            from: from_address,
            to,
            bytes: bytes.to_vec(),
        });
        drop(state);
        if earliest {
            self.wake.notify_one();
        }
    }
}

/// One endpoint's socket on the [`Network`].
#[derive(Debug)]
pub struct Socket {
    network: Arc<Network>,
    address: SocketAddr,
    port: Arc<Port>,
}

impl Socket {
    /// What went through it.
    pub fn traffic(&self) -> Arc<Traffic> {
        self.port.traffic.clone()
    }
}

#[derive(Debug)]
struct AlwaysWritable;

impl quinn::UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl quinn::AsyncUdpSocket for Socket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn quinn::UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        match transmit.segment_size {
            Some(size) if size < transmit.contents.len() => {
                for segment in transmit.contents.chunks(size) {
                    self.network
                        .send(&self.port, self.address, transmit.destination, segment);
                }
            }
            _ => self.network.send(
                &self.port,
                self.address,
                transmit.destination,
                transmit.contents,
            ),
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut inbox = self.port.inbox.lock().unwrap_or_else(|p| p.into_inner());
        let mut count = 0;
        while count < bufs.len().min(meta.len()) {
            let Some((from, bytes)) = inbox.queue.pop_front() else {
                break;
            };
            let len = bytes.len().min(bufs[count].len());
            bufs[count][..len].copy_from_slice(&bytes[..len]);
            meta[count] = RecvMeta {
                addr: from,
                len,
                stride: len,
                ..RecvMeta::default()
            };
            count += 1;
        }
        if count > 0 {
            return Poll::Ready(Ok(count));
        }
        inbox.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.address)
    }
}

/// A quinn endpoint on the simulated network.
pub fn endpoint(
    socket: Arc<Socket>,
    server: Option<quinn::ServerConfig>,
) -> io::Result<quinn::Endpoint> {
    quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        server,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(host: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, host], 5000))
    }

    fn arrived(socket: &Socket) -> usize {
        socket.port.inbox.lock().unwrap().queue.len()
    }

    #[tokio::test(start_paused = true)]
    async fn links_lose_delay_cap_and_black_out() {
        let network = Network::new(3);
        tokio::spawn(network.clone().deliver());
        let hub = network.socket(address(1), None);
        let send = |socket: &Socket, count: usize, size: usize| {
            for _ in 0..count {
                network.send(&socket.port, socket.address, address(1), &vec![0; size]);
            }
        };
        // Loss and delay: a quarter lost, the rest after half the round trip.
        let lossy = network.socket(
            address(2),
            Some(Link {
                loss: 0.25,
                rtt: Duration::from_millis(100),
                ..Link::default()
            }),
        );
        send(&lossy, 2000, 100);
        tokio::time::sleep(Duration::from_millis(49)).await;
        assert_eq!(arrived(&hub), 0, "nothing before the one-way delay");
        tokio::time::sleep(Duration::from_millis(2)).await;
        let delivered = arrived(&hub);
        assert!(
            (1400..1600).contains(&delivered),
            "{delivered} of 2000 at 25% loss"
        );
        assert_eq!(
            lossy.traffic().dropped.load(Ordering::Relaxed),
            2000 - delivered as u64
        );
        hub.port.inbox.lock().unwrap().queue.clear();

        // Bandwidth: 1 MB/s with a 10 s queue: 1 MB takes a second on the wire.
        let slow = network.socket(
            address(3),
            Some(Link {
                rtt: Duration::ZERO,
                bandwidth: 8_000_000,
                queue: Duration::from_secs(10),
                ..Link::default()
            }),
        );
        send(&slow, 100, 10_000);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let half = arrived(&hub);
        assert!(
            (45..=55).contains(&half),
            "{half} of 100 after half a second"
        );
        tokio::time::sleep(Duration::from_millis(510)).await;
        assert_eq!(arrived(&hub), 100);
        hub.port.inbox.lock().unwrap().queue.clear();

        // A full queue drops the tail; an outage drops everything.
        let queued = network.socket(
            address(4),
            Some(Link {
                bandwidth: 8_000,
                queue: Duration::from_secs(1),
                ..Link::default()
            }),
        );
        send(&queued, 10, 1_000);
        assert!(
            queued.traffic().dropped.load(Ordering::Relaxed) >= 8,
            "1 kB/s holds one second"
        );
        let now = Instant::now() - network.start;
        let dark = network.socket(
            address(5),
            Some(Link {
                outages: vec![(now, now + Duration::from_secs(60))],
                ..Link::default()
            }),
        );
        send(&dark, 10, 100);
        assert_eq!(dark.traffic().dropped.load(Ordering::Relaxed), 10);
    }
}
