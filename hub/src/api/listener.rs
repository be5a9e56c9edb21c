//! The admin and hooks listeners: TCP, HTTPS when a certificate is configured (rustls on ring,
//! as the rest of the project), and HTTP/1.1 served by hand ([`serve`]) so that a slow or
//! hostile client cannot hold the API:
//! - at most [`MAX_PER_SOURCE`] connections open from one address (one /64 for IPv6): more
//!   from that address are closed as they arrive, so one machine cannot take the places of the
//!   others;
//! - at most [`MAX_CONNECTIONS`] open at once on a listener; a new one past that takes the
//!   place of the connection that has waited longest without a request in progress (a
//!   connection that only holds its place goes first), so many machines together cannot lock
//!   the API out either — the listener never stops accepting;
//! - [`HANDSHAKE_WITHIN`] to finish a TLS handshake;
//! - [`HEADER_READ_TIMEOUT`] to send a request's headers, counted from the connection's start
//!   and again from the end of each response (a kept-alive connection that sends nothing is
//!   closed after it too). `axum::serve` has no such deadline (hyper's needs a timer), which let
//!   1,100 half-open connections lock the API out;
//! - [`REQUEST_TIMEOUT`] for a request to be read and answered (a body sent a byte at a time
//!   gets 408 and the connection is closed).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use tokio::sync::{Notify, mpsc};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::config::TlsFiles;

/// A connection a listener closed before it served a request, and why.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// `admin` or `hooks`.
    pub listener: &'static str,
    /// `source_share` (its address held [`MAX_PER_SOURCE`] already), `header_timeout` (no
    /// complete request headers within [`HEADER_READ_TIMEOUT`]), `handshake` (no TLS
    /// handshake within [`HANDSHAKE_WITHIN`]), `displaced` (idle longest when the listener was
    /// full), `full` (the listener held [`MAX_CONNECTIONS`] requests in progress) or
    /// `request_timeout` (a request not answered within [`REQUEST_TIMEOUT`]).
    pub reason: &'static str,
}

/// Connections the admin and hooks listeners of this process closed unserved
/// (`outpost_hub_http_connections_refused_total`).
pub fn refused() -> &'static Family<RefusedLabels, Counter> {
    static REFUSED: std::sync::OnceLock<Family<RefusedLabels, Counter>> =
        std::sync::OnceLock::new();
    REFUSED.get_or_init(Family::default)
}

fn count_refused(listener: &'static str, reason: &'static str) {
    refused()
        .get_or_create(&RefusedLabels { listener, reason })
        .inc();
}

/// Connections open at once on one listener; a new one past that closes the one idle longest.
pub const MAX_CONNECTIONS: usize = 1024;
/// Connections open at once from one source address (IPv6: one /64 network); more are closed
/// as they arrive.
pub const MAX_PER_SOURCE: usize = 64;
/// How long a client has to finish the TLS handshake.
pub const HANDSHAKE_WITHIN: Duration = Duration::from_secs(10);
/// How long a client has to send a request's headers: from the connection's start, and from
/// the end of each response while the connection is kept alive.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request may take from its headers to the end of its answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// A PEM file could not be read.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the certificate or key.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// Reads the certificate chain and key into a TLS 1.3 server configuration (ALPN http/1.1).
pub fn tls_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, ListenerError> {
    let pem = |path: &Path, message: String| ListenerError::Pem {
        path: path.to_owned(),
        message,
    };
    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|error| pem(&files.cert, error.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|error| pem(&files.cert, error.to_string()))?;
    if certificates.is_empty() {
        return Err(pem(&files.cert, "holds no PEM certificate".to_owned()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|error| pem(&files.key, format!("{error} (expected a PEM private key)")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certificates, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Connections the kernel queues for a listener before it accepts them (capped by
/// `net.core.somaxconn`): under a flood of connections a short queue overflows and a real
/// client's connection waits a second for its SYN to be sent again.
pub const BACKLOG: i32 = 4096;

/// A TCP listener on `address` with a queue of [`BACKLOG`] (tokio's own `bind` asks for less).
pub fn bind(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(address),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// An accepted connection, plain or TLS, holding its place among the open connections and
/// among those of its source.
pub struct Connection {
    stream: Stream,
    place: Place,
    _slot: SourceSlot,
}

/// When this process started: connections' activity is counted in milliseconds since.
fn millis() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// What one open connection is doing.
#[derive(Debug)]
struct Activity {
    /// Requests in progress.
    busy: AtomicUsize,
    /// When it opened or last started or finished a request ([`millis`]).
    last: AtomicU64,
    /// Told when the connection must close to make room.
    displace: Notify,
}

impl Activity {
    fn touch(&self) {
        self.last.store(millis(), Ordering::Relaxed);
    }
}

/// The connections open on one listener.
#[derive(Debug, Default)]
struct Open {
    next: AtomicU64,
    table: std::sync::Mutex<HashMap<u64, Arc<Activity>>>,
}

impl Open {
    /// A place for a new connection: when [`MAX_CONNECTIONS`] are open, the one without a
    /// request in progress that has been idle longest is told to close and gives its place;
    /// `None` when every open connection has a request in progress.
    fn admit(self: &Arc<Self>) -> Option<Place> {
        let mut table = self
            .table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if table.len() >= MAX_CONNECTIONS {
            let idle = table
                .iter()
                .filter(|(_, activity)| activity.busy.load(Ordering::Relaxed) == 0)
                .min_by_key(|(_, activity)| activity.last.load(Ordering::Relaxed))
                .map(|(id, _)| *id)?;
            if let Some(activity) = table.remove(&idle) {
                activity.displace.notify_one();
            }
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity {
            busy: AtomicUsize::new(0),
            last: AtomicU64::new(millis()),
            displace: Notify::new(),
        });
        table.insert(id, activity.clone());
        Some(Place {
            open: self.clone(),
            id,
            activity,
        })
    }
}

/// One connection's place among the open ones; given back when dropped.
#[derive(Debug)]
struct Place {
    open: Arc<Open>,
    id: u64,
    activity: Arc<Activity>,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.open
            .table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&self.id);
    }
}

/// Open connections per source (an IPv4 address, an IPv6 /64).
#[derive(Debug, Default)]
struct Sources(std::sync::Mutex<HashMap<IpAddr, usize>>);

impl Sources {
    /// A place for one more connection from `address`, unless it holds [`MAX_PER_SOURCE`].
    fn take(self: &Arc<Self>, address: IpAddr) -> Option<SourceSlot> {
        let key = source_key(address);
        let mut open = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = open.entry(key).or_insert(0);
        if *count >= MAX_PER_SOURCE {
            return None;
        }
        *count += 1;
        Some(SourceSlot {
            sources: self.clone(),
            key,
        })
    }
}

/// One connection's place among those of its source; given back when dropped.
#[derive(Debug)]
struct SourceSlot {
    sources: Arc<Sources>,
    key: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut open = self
            .sources
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// The source a connection counts against: an IPv4 address (also written as IPv6), or the /64
/// network of an IPv6 address (one machine commonly holds a whole /64).
fn source_key(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let segments = v6.segments();
                IpAddr::V6(Ipv6Addr::new(
                    segments[0],
                    segments[1],
                    segments[2],
                    segments[3],
                    0,
                    0,
                    0,
                    0,
                ))
            }
        },
    }
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.stream {
            Stream::Plain(_) => "Connection(plain)",
            Stream::Tls(_) => "Connection(tls)",
        })
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(stream) => Pin::new(stream).poll_read(context, buffer),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_read(context, buffer),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Plain(stream) => Pin::new(stream).poll_write(context, bytes),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_write(context, bytes),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(stream) => Pin::new(stream).poll_flush(context),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(context),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(stream) => Pin::new(stream).poll_shutdown(context),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(context),
        }
    }
}

/// A listener for [`serve`]: connections arrive through a channel from an accept task that
/// enforces the limits and does the TLS handshakes, so one slow handshake never holds up the
/// others.
#[derive(Debug)]
pub struct HttpListener {
    connections: mpsc::Receiver<(Connection, SocketAddr)>,
    local: SocketAddr,
    name: &'static str,
}

impl HttpListener {
    /// Starts accepting on `listener`, with TLS if `tls` is given; `name` (`admin`, `hooks`)
    /// labels what it refuses in the metrics.
    pub fn new(
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
        name: &'static str,
    ) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let (sender, connections) = mpsc::channel(64);
        let open = Arc::new(Open::default());
        let sources = Arc::new(Sources::default());
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        tokio::spawn(async move {
            let mut refused: u64 = 0;
            loop {
                let (stream, remote) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::debug!(%error, "accepting an admin connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(slot) = sources.take(remote.ip()) else {
                    // Closed at once: this source holds its share already.
                    refused += 1;
                    count_refused(name, "source_share");
                    if refused.is_power_of_two() {
                        tracing::warn!(%remote, refused, "a source holds {MAX_PER_SOURCE} admin connections already; closing more from it");
                    }
                    continue;
                };
                let Some(place) = open.admit() else {
                    count_refused(name, "full");
                    tracing::debug!(%remote, "every admin connection has a request in progress; closed");
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let Some(acceptor) = acceptor.clone() else {
                    let connection = Connection {
                        stream: Stream::Plain(stream),
                        place,
                        _slot: slot,
                    };
                    if sender.send((connection, remote)).await.is_err() {
                        return;
                    }
                    continue;
                };
                let sender = sender.clone();
                tokio::spawn(async move {
                    let handshake = tokio::time::timeout(HANDSHAKE_WITHIN, acceptor.accept(stream));
                    let shaken = tokio::select! {
                        shaken = handshake => shaken,
                        () = place.activity.displace.notified() => {
                            count_refused(name, "displaced");
                            return;
                        }
                    };
                    match shaken {
                        Ok(Ok(stream)) => {
                            let connection = Connection {
                                stream: Stream::Tls(Box::new(stream)),
                                place,
                                _slot: slot,
                            };
                            let _ = sender.send((connection, remote)).await;
                        }
                        Ok(Err(error)) => {
                            tracing::debug!(%remote, %error, "TLS handshake failed on the admin listener");
                        }
                        Err(_) => {
                            count_refused(name, "handshake");
                            tracing::debug!(%remote, "TLS handshake too slow; dropped")
                        }
                    }
                });
            }
        });
        Ok(HttpListener {
            connections,
            local,
            name,
        })
    }
}

impl HttpListener {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

/// Serves `app` on `listener` (HTTP/1.1) until its accept task ends: each connection on a task
/// of its own, its request headers due within [`HEADER_READ_TIMEOUT`], each request answered
/// within [`REQUEST_TIMEOUT`], closed early when a newer connection needs its place.
pub async fn serve(mut listener: HttpListener, app: axum::Router) {
    let name = listener.name;
    while let Some((connection, remote)) = listener.connections.recv().await {
        let activity = connection.place.activity.clone();
        let inner = hyper_util::service::TowerToHyperService::new(app.clone());
        let working = activity.clone();
        let service = hyper::service::service_fn(move |request| {
            let working = working.clone();
            working.busy.fetch_add(1, Ordering::Relaxed);
            working.touch();
            let answer = hyper::service::Service::call(&inner, request);
            async move {
                let answer = tokio::time::timeout(REQUEST_TIMEOUT, answer).await;
                working.busy.fetch_sub(1, Ordering::Relaxed);
                working.touch();
                match answer {
                    Ok(answer) => answer,
                    Err(_) => {
                        count_refused(name, "request_timeout");
                        let mut response = axum::response::Response::new(axum::body::Body::from(
                            "the request was not read and answered in time\n",
                        ));
                        *response.status_mut() = axum::http::StatusCode::REQUEST_TIMEOUT;
                        response.headers_mut().insert(
                            axum::http::header::CONNECTION,
                            axum::http::HeaderValue::from_static("close"),
                        );
                        Ok(response)
                    }
                }
            }
        });
        tokio::spawn(async move {
            let serving = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(connection), service);
            tokio::select! {
                served = serving => {
                    if let Err(error) = served {
                        if error.is_timeout() {
                            count_refused(name, "header_timeout");
                        }
                        tracing::debug!(%remote, %error, "an admin connection ended");
                    }
                }
                () = activity.displace.notified() => {
                    count_refused(name, "displaced");
                    tracing::debug!(%remote, "an idle admin connection closed to make room");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_addresses_and_ipv6_networks() {
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(source_key(v4), v4);
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(source_key(mapped), v4);
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(other));
    }

    #[test]
    fn a_source_gets_its_share_and_no_more_and_gets_it_back() {
        let sources = Arc::new(Sources::default());
        let address: IpAddr = "192.0.2.7".parse().unwrap();
        let held: Vec<SourceSlot> = (0..MAX_PER_SOURCE)
            .map(|_| sources.take(address).expect("within the share"))
            .collect();
        assert!(sources.take(address).is_none(), "one more is refused");
        assert!(
            sources.take("192.0.2.8".parse().unwrap()).is_some(),
            "another source is not"
        );
        drop(held);
        assert!(sources.take(address).is_some(), "places come back");
        assert!(sources.0.lock().unwrap().len() <= 1, "no entry left behind");
    }

    #[test]
    fn a_full_listener_displaces_the_longest_idle_connection_never_a_busy_one() {
        let open = Arc::new(Open::default());
        let mut places: Vec<Place> = (0..MAX_CONNECTIONS)
            .map(|_| open.admit().expect("room"))
            .collect();
        // The first is busy, the second idle since long ago, the rest idle since now.
        places[0].activity.busy.store(1, Ordering::Relaxed);
        places[0].activity.last.store(0, Ordering::Relaxed);
        places[1].activity.last.store(0, Ordering::Relaxed);
        for place in &places[2..] {
            place.activity.last.store(1_000, Ordering::Relaxed);
        }
        let newest = open.admit().expect("room is made");
        assert_eq!(open.table.lock().unwrap().len(), MAX_CONNECTIONS);
        let displaced = places.remove(1);
        assert!(
            !open.table.lock().unwrap().contains_key(&displaced.id),
            "the longest idle gave its place"
        );
        assert!(
            open.table.lock().unwrap().contains_key(&places[0].id),
            "not the busy one"
        );
        // Told to close: a waiter is woken at once.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(1),
                displaced.activity.displace.notified(),
            )
            .await
            .expect("told to close");
        });
        drop(displaced);
        assert_eq!(
            open.table.lock().unwrap().len(),
            MAX_CONNECTIONS,
            "its drop removes nothing else"
        );
        // Every one busy: no room, the new one is refused.
        for place in places.iter().chain([&newest]) {
            place.activity.busy.store(1, Ordering::Relaxed);
        }
        assert!(open.admit().is_none());
        drop(places);
        drop(newest);
        assert!(open.table.lock().unwrap().is_empty());
    }
}
