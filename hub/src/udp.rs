//! UDP sockets for QUIC sized for bursts: thousands of handshakes a second overflow the
//! kernel's default receive buffer (about 200 KiB here) and every dropped datagram is a
//! retransmission a second later. The sizes asked for are capped by `net.core.rmem_max` and
//! `net.core.wmem_max`; what the kernel granted is returned so the caller can log it.

use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// What a socket got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffers {
    /// Receive buffer in bytes (as the kernel reports it: it counts its own overhead too).
    pub receive: usize,
    /// Send buffer in bytes.
    pub send: usize,
}

/// The buffer size asked for by default: 16 MiB each way.
pub const WANTED_BUFFER: usize = 16 << 20;

/// Binds a UDP socket on `address` with receive and send buffers of `wanted` bytes (or what
/// the kernel allows); `0` leaves the kernel's defaults.
pub fn bind(address: SocketAddr, wanted: usize) -> std::io::Result<(std::net::UdpSocket, Buffers)> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    // Best effort: a smaller buffer than asked is not an error, only slower under bursts.
    if wanted > 0 {
        let _ = socket.set_recv_buffer_size(wanted);
        let _ = socket.set_send_buffer_size(wanted);
    }
    socket.bind(&address.into())?;
    let buffers = Buffers {
        receive: socket.recv_buffer_size()?,
        send: socket.send_buffer_size()?,
    };
    Ok((socket.into(), buffers))
}

/// A quinn endpoint on a socket from [`bind`].
pub fn endpoint(
    address: SocketAddr,
    server: Option<quinn::ServerConfig>,
    wanted: usize,
) -> std::io::Result<(quinn::Endpoint, Buffers)> {
    let (socket, buffers) = bind(address, wanted)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for the QUIC endpoint"))?;
    let endpoint = quinn::Endpoint::new(quinn::EndpointConfig::default(), server, socket, runtime)?;
    Ok((endpoint, buffers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn buffers_are_raised_as_far_as_the_kernel_allows() {
        let wanted = 4 << 20;
        let (endpoint, buffers) = endpoint("127.0.0.1:0".parse().unwrap(), None, wanted).unwrap();
        assert!(endpoint.local_addr().unwrap().port() > 0);
        // The kernel grants up to `net.core.rmem_max` and reports twice what it granted (it
        // counts its bookkeeping); on a machine with the stock cap that is still the cap.
        let cap = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|text| text.trim().parse::<usize>().ok());
        if let Some(cap) = cap {
            assert!(buffers.receive >= wanted.min(cap), "{buffers:?}, cap {cap}");
        }
        let default = bind("127.0.0.1:0".parse().unwrap(), 0).unwrap().1;
        assert!(
            buffers.receive >= default.receive,
            "{buffers:?} vs {default:?}"
        );
    }
}
