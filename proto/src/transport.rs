//! TLS and QUIC settings that hub and agents must agree on (cargo feature `transport`).
//!
//! Identities are raw ed25519 public keys (RFC 7250), not X.509 certificates: there is no CA to
//! run and nothing to expire. The agent pins the hub's key (the SHA-256 of its
//! SubjectPublicKeyInfo, from the enrolment bundle); the hub accepts any ed25519 key in the
//! handshake and then maps it to an agent record, refusing unknown and revoked keys at the
//! application layer with an error that says so. TLS 1.3 only, the `ring` provider only (two
//! providers in one binary panic at run time, see CRATES.md), ALPN [`crate::wire::ALPN`].
//!
//! Building configurations is not I/O: this module keeps to `proto`'s rule; sockets live in the
//! hub and the agent.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{
    CertificateDer, PrivatePkcs8KeyDer, ServerName, SubjectPublicKeyInfoDer, UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::digest::Digest;
use crate::signing::{PublicKey, SigningKey};
use crate::wire::ALPN;

/// The server name agents put in the TLS handshake (the pin, not the name, authenticates).
pub const SERVER_NAME: &str = "outpost-hub";

/// QUIC transport tuning for lossy, high-latency, NAT-ed links.
#[derive(Debug, Clone, PartialEq)]
pub struct Tuning {
    /// Keep-alive: below typical NAT and cellular UDP binding timeouts (~30 s).
    pub keep_alive: Duration,
    /// A connection with no packets for this long is dead (the lower of both peers' wins).
    pub idle_timeout: Duration,
    /// Receive window per stream and per connection: at least bandwidth × RTT with headroom
    /// for losses, or a long fat link stalls on flow control.
    pub receive_window: u64,
    /// Congestion control.
    pub congestion: Congestion,
    /// First RTT guess before a sample exists.
    pub initial_rtt: Duration,
}

/// How much the hub lets a peer send it before the peer is identified as an enrolled agent
/// (connection-level flow control, and one stream), so unknown peers cannot make it buffer
/// much. [`AGENT_RECEIVE_WINDOW`] and [`AGENT_STREAMS`] apply once it is identified.
pub const UNIDENTIFIED_RECEIVE_WINDOW: u64 = 64 << 10;
/// What an identified agent may have in flight towards the hub (status reports are small).
pub const AGENT_RECEIVE_WINDOW: u64 = 1 << 20;
/// Streams an identified agent may open at once: the control stream and fetches.
pub const AGENT_STREAMS: u32 = 8;
/// The receive window of each stream the hub reads (bounded by the connection's).
const HUB_STREAM_RECEIVE_WINDOW: u64 = 256 << 10;

/// Which congestion controller the sender runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Congestion {
    /// quinn's default, loss-based: halves its window on loss, so random loss starves it.
    Cubic,
    /// quinn's BBR (our default): paces at the measured bottleneck rate and keeps about two
    /// bandwidth-delay products in flight, so random loss costs little more than the lost
    /// packets. (It still enters packet-conservation recovery on loss; a variant that ignored
    /// isolated losses measured no better here, see docs/benchmarks.md.)
    Bbr,
}

impl Default for Tuning {
    fn default() -> Tuning {
        Tuning {
            keep_alive: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(60),
            receive_window: 8 << 20,
            congestion: Congestion::Bbr,
            initial_rtt: Duration::from_millis(300),
        }
    }
}

/// Why a configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TransportSetupError {
    /// rustls refused the key or the settings.
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    /// quinn refused the TLS configuration.
    #[error("QUIC setup: {0}")]
    Quic(String),
}

/// The hub's pin: SHA-256 of its ed25519 SubjectPublicKeyInfo. Agents refuse any other hub.
pub fn hub_pin(hub_key: &PublicKey) -> Digest {
    Digest::of(&hub_key.to_spki_der())
}

/// The hub's QUIC server configuration: its raw public key, client keys required.
pub fn server_config(
    hub_key: &SigningKey,
    tuning: &Tuning,
) -> Result<quinn::ServerConfig, TransportSetupError> {
    let provider = provider();
    let verifier = AnyAgentKey {
        algorithms: provider.signature_verification_algorithms,
    };
    let mut tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(
            rustls::server::AlwaysResolvesServerRawPublicKeys::new(certified_key(
                hub_key, &provider,
            )?),
        ));
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|error| TransportSetupError::Quic(error.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = transport_config(tuning);
    // The hub receives little (status reports); until it knows the peer, almost nothing.
    transport.receive_window(quinn::VarInt::from_u32(UNIDENTIFIED_RECEIVE_WINDOW as u32));
    transport.stream_receive_window(quinn::VarInt::from_u32(HUB_STREAM_RECEIVE_WINDOW as u32));
    transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(1));
    // Agents keep their connections (and their NAT bindings) alive; the hub answering their
    // pings is enough. Pinging from both ends doubled the packets of an idle fleet (100,000
    // agents: ~13,000 datagrams a second more) for nothing the idle timeout does not catch.
    transport.keep_alive_interval(None);
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Gives an identified agent's connection its full flow-control allowance.
pub fn allow_identified(connection: &quinn::Connection) {
    connection.set_receive_window(quinn::VarInt::from_u32(AGENT_RECEIVE_WINDOW as u32));
    connection.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(AGENT_STREAMS));
}

/// An agent's QUIC client configuration: its raw public key, the hub's key pinned.
pub fn client_config(
    agent_key: &SigningKey,
    hub_pin: Digest,
    tuning: &Tuning,
) -> Result<quinn::ClientConfig, TransportSetupError> {
    let provider = provider();
    let verifier = PinnedHub {
        pin: hub_pin,
        algorithms: provider.signature_verification_algorithms,
    };
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(
            rustls::client::AlwaysResolvesClientRawPublicKeys::new(certified_key(
                agent_key, &provider,
            )?),
        ));
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))
        .map_err(|error| TransportSetupError::Quic(error.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(tuning)));
    Ok(config)
}

/// The ed25519 key the peer proved it holds in the handshake, if it presented one.
pub fn peer_public_key(connection: &quinn::Connection) -> Option<PublicKey> {
    let identity = connection.peer_identity()?;
    let certificates = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    PublicKey::from_spki_der(certificates.first()?.as_ref()).ok()
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport_config(tuning: &Tuning) -> quinn::TransportConfig {
    let mut config = quinn::TransportConfig::default();
    config.keep_alive_interval(Some(tuning.keep_alive));
    config.max_idle_timeout(quinn::IdleTimeout::try_from(tuning.idle_timeout).ok());
    let window = quinn::VarInt::from_u64(tuning.receive_window).unwrap_or(quinn::VarInt::MAX);
    config.stream_receive_window(window);
    config.receive_window(window);
    config.send_window(tuning.receive_window.saturating_mul(2));
    config.initial_rtt(tuning.initial_rtt);
    // Few streams per connection: one control stream and one transfer at a time, with room.
    config.max_concurrent_bidi_streams(quinn::VarInt::from_u32(16));
    config.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    match tuning.congestion {
        Congestion::Cubic => config
            .congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default())),
        Congestion::Bbr => {
            config.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
        }
    };
    config
}

/// PKCS#8 v1 wrapping of an ed25519 seed (RFC 8410), the form rustls's ring signer reads.
fn certified_key(
    key: &SigningKey,
    provider: &CryptoProvider,
) -> Result<Arc<rustls::sign::CertifiedKey>, TransportSetupError> {
    const PKCS8_PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    let mut pkcs8 = PKCS8_PREFIX.to_vec();
    pkcs8.extend_from_slice(&key.seed());
    let signer = provider
        .key_provider
        .load_private_key(PrivatePkcs8KeyDer::from(pkcs8).into())?;
    let spki = CertificateDer::from(key.public_key().to_spki_der());
    Ok(Arc::new(rustls::sign::CertifiedKey::new(
        vec![spki],
        signer,
    )))
}

fn verify_raw(
    message: &[u8],
    spki: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
    algorithms: &WebPkiSupportedAlgorithms,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature_with_raw_key(
        message,
        &SubjectPublicKeyInfoDer::from(spki.as_ref()),
        dss,
        algorithms,
    )
}

/// The signature checks both verifiers share: TLS 1.3 only, ed25519 raw public keys only.
macro_rules! raw_key_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::Tls12NotOffered,
            ))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_raw(message, cert, dss, &self.algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            vec![SignatureScheme::ED25519]
        }

        fn requires_raw_public_keys(&self) -> bool {
            true
        }
    };
}

/// The agent's check of the hub: its raw key must hash to the pin.
#[derive(Debug)]
struct PinnedHub {
    pin: Digest,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedHub {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if Digest::of(end_entity.as_ref()) == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the hub's key does not match the pinned key {}; check the enrolment bundle",
                self.pin.short()
            )))
        }
    }

    raw_key_signatures!();
}

/// The hub's check of a client in the handshake: any ed25519 key that proves possession. Which
/// agent (if any) owns the key is decided after the handshake, where a refusal can say why.
#[derive(Debug)]
struct AnyAgentKey {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyAgentKey {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        PublicKey::from_spki_der(end_entity.as_ref())
            .map(|_| ClientCertVerified::assertion())
            .map_err(|_| {
                rustls::Error::General("agent identity is not an ed25519 raw public key".into())
            })
    }

    raw_key_signatures!();
}

/// A stream failed or carried something that is not a frame of this protocol.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The QUIC stream or connection broke.
    #[error("connection: {0}")]
    Read(#[from] quinn::ReadError),
    /// Writing failed.
    #[error("connection: {0}")]
    Write(#[from] quinn::WriteError),
    /// The bytes are not a frame of this protocol.
    #[error(transparent)]
    Wire(#[from] crate::wire::WireError),
    /// The peer closed the stream in the middle of a frame.
    #[error("the peer closed the stream inside a frame ({0} bytes pending)")]
    Truncated(usize),
}

/// Reads frames from a QUIC stream. Cancel-safe: dropping a pending [`MessageReader::next`]
/// loses no bytes, so it can sit in a `select!`. It keeps no read buffer of its own (quinn's
/// chunks are taken as they come), so an idle connection's reader holds only the bytes of a
/// frame not yet complete.
#[derive(Debug)]
pub struct MessageReader {
    stream: quinn::RecvStream,
    decoder: crate::wire::FrameDecoder,
}

impl MessageReader {
    /// Wraps the receiving half of a stream.
    pub fn new(stream: quinn::RecvStream) -> MessageReader {
        MessageReader {
            stream,
            decoder: crate::wire::FrameDecoder::new(),
        }
    }

    /// The next message, or `None` when the peer finished the stream cleanly.
    pub async fn next(&mut self) -> Result<Option<crate::wire::Message>, StreamError> {
        loop {
            if let Some(message) = self.decoder.next_message()? {
                return Ok(Some(message));
            }
            match self
                .stream
                .read_chunk(crate::wire::MAX_FRAME_SIZE + 4, true)
                .await?
            {
                Some(chunk) => self.decoder.push(&chunk.bytes),
                None if self.decoder.pending() == 0 => return Ok(None),
                None => return Err(StreamError::Truncated(self.decoder.pending())),
            }
        }
    }
}

/// Writes one message as a frame.
pub async fn send_message(
    stream: &mut quinn::SendStream,
    message: &crate::wire::Message,
) -> Result<(), StreamError> {
    let frame = crate::wire::encode_frame(message)?;
    stream.write_all(&frame).await?;
    Ok(())
}
