//! Abusive clients for the listener attacks (tests/trust.rs) and their figures
//! (benches/admin_abuse.rs): connections that send half a request header and stop, from a
//! source address of their own.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt as _;

/// Opens `count` connections from `from` (a loopback address such as 127.0.0.2: another
/// "machine") to `to`, each sending part of a request header and then nothing; keeps them.
pub async fn half_open(from: IpAddr, to: SocketAddr, count: usize) -> Vec<tokio::net::TcpStream> {
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
        socket
            .bind(SocketAddr::new(from, 0))
            .expect("bind the attacker's address");
        let mut stream = socket.connect(to).await.expect("connect");
        // The hub may have closed it already (the source's share is full): no matter.
        let _ = stream
            .write_all(b"GET /live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            .await;
        held.push(stream);
    }
    held
}

/// Keeps `count` half-open connections from `from` to `to` until aborted: each one that the
/// hub closes is opened again at once (a determined attacker). Counts the connections opened
/// in `opened`.
pub fn keep_half_open(
    runtime: &tokio::runtime::Runtime,
    from: IpAddr,
    to: SocketAddr,
    count: usize,
    opened: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<()>> {
    use tokio::io::AsyncReadExt as _;
    (0..count)
        .map(|_| {
            let opened = opened.clone();
            runtime.spawn(async move {
                loop {
                    let Ok(socket) = tokio::net::TcpSocket::new_v4() else {
                        return;
                    };
                    if socket.bind(SocketAddr::new(from, 0)).is_err() {
                        return;
                    }
                    let Ok(mut stream) = socket.connect(to).await else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let _ = stream
                        .write_all(b"GET /live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                        .await;
                    // Hold it until the hub closes it.
                    let mut buffer = [0u8; 256];
                    while let Ok(read) = stream.read(&mut buffer).await {
                        if read == 0 {
                            break;
                        }
                    }
                }
            })
        })
        .collect()
}

/// One plain HTTP/1.1 request from 127.0.0.1 (`Connection: close`); its status line (empty if
/// none came within `patience`) and how long it took.
pub fn timed_request(to: SocketAddr, request: &str, patience: Duration) -> (String, Duration) {
    let started = Instant::now();
    let Ok(mut stream) = TcpStream::connect_timeout(&to, patience) else {
        return (String::new(), started.elapsed());
    };
    let _ = stream.set_read_timeout(Some(patience));
    if stream.write_all(request.as_bytes()).is_err() {
        return (String::new(), started.elapsed());
    }
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    (
        text.lines().next().unwrap_or_default().to_owned(),
        started.elapsed(),
    )
}

/// `GET /live`, as [`timed_request`] sends it.
pub const GET_LIVE: &str = "GET /live HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";

/// A protocol session opened with an enrolled agent's own key (from its state dir), as a
/// device under an attacker's control would: the connection, the control stream's writer and
/// reader, after `hello` was sent.
pub async fn forged_session(
    state_dir: &std::path::Path,
    hub: SocketAddr,
    hello: outpost_proto::wire::Hello,
) -> (
    quinn::Connection,
    quinn::SendStream,
    outpost_proto::transport::MessageReader,
) {
    let (key, _) = outpost_agent::identity::load_or_create(&outpost_agent::paths::key(state_dir))
        .expect("the agent's key");
    let (state, _) = outpost_agent::open_state(state_dir).expect("the agent's state");
    let pin = state
        .enrolment()
        .expect("the enrolment")
        .expect("an enrolled agent")
        .hub_pin;
    drop(state);
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("an endpoint");
    let config = outpost_proto::transport::client_config(
        &key,
        pin,
        &outpost_proto::transport::Tuning::default(),
    )
    .expect("a client config");
    let connection = endpoint
        .connect_with(config, hub, "outpost-hub")
        .expect("connect")
        .await
        .expect("the handshake");
    let (mut control, recv) = connection.open_bi().await.expect("a control stream");
    outpost_proto::transport::send_message(
        &mut control,
        &outpost_proto::wire::Message::Hello(hello),
    )
    .await
    .expect("send Hello");
    (
        connection,
        control,
        outpost_proto::transport::MessageReader::new(recv),
    )
}
