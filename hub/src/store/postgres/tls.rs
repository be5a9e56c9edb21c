//! TLS to the database for tokio-postgres, with rustls: the server's certificate is checked
//! against the operator's CA file (or, without one, the Mozilla roots) and the host name in the
//! URL — what libpq calls `sslmode=verify-full`. Chosen by the URL's `sslmode=require` or by a
//! CA file; without either the connection is plain (and [`plain_to_remote`] says whether that
//! crosses a network).

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

use crate::store::StoreError;

/// How the store reaches the database: plain, or TLS with this client configuration.
#[derive(Clone)]
pub struct StoreTls(Option<Arc<rustls::ClientConfig>>);

impl std::fmt::Debug for StoreTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            Some(_) => "StoreTls(verified)",
            None => "StoreTls(off)",
        })
    }
}

impl StoreTls {
    /// Decides for `config` (its `sslmode`) and `ca_file`: TLS when the URL says
    /// `sslmode=require` or a CA file is given (then `config` is set to require it); plain
    /// otherwise (then `config` is set not to try TLS).
    pub fn choose(
        config: &mut tokio_postgres::Config,
        ca_file: Option<&Path>,
    ) -> Result<StoreTls, StoreError> {
        if ca_file.is_none() && config.get_ssl_mode() != SslMode::Require {
            config.ssl_mode(SslMode::Disable);
            return Ok(StoreTls(None));
        }
        config.ssl_mode(SslMode::Require);
        let mut roots = rustls::RootCertStore::empty();
        match ca_file {
            Some(path) => {
                let bad = |message: String| {
                    StoreError::Postgres(format!(
                        "store_ca_file {}: {message}; give the PEM file of the CA that signed the database server's certificate",
                        path.display()
                    ))
                };
                let certificates: Vec<CertificateDer<'static>> =
                    CertificateDer::pem_file_iter(path)
                        .map_err(|error| bad(error.to_string()))?
                        .collect::<Result<_, _>>()
                        .map_err(|error| bad(error.to_string()))?;
                if certificates.is_empty() {
                    return Err(bad("holds no PEM certificate".to_owned()));
                }
                for certificate in certificates {
                    roots
                        .add(certificate)
                        .map_err(|error| bad(format!("not a CA certificate ({error})")))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| StoreError::Postgres(format!("TLS to the database: {error}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(StoreTls(Some(Arc::new(config))))
    }

    /// Whether connections are TLS.
    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }
}

/// Whether a plain connection to `config`'s hosts would cross a network (a host that is
/// neither a Unix socket nor a loopback address or `localhost`).
pub(super) fn plain_to_remote(config: &tokio_postgres::Config) -> bool {
    config.get_hosts().iter().any(|host| match host {
        Host::Tcp(name) => {
            let name = name.trim_start_matches('[').trim_end_matches(']');
            !(name == "localhost"
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|address| address.is_loopback()))
        }
        Host::Unix(_) => false,
    })
}

impl<S> MakeTlsConnect<S> for StoreTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type TlsConnect = Connect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<Connect, io::Error> {
        Ok(Connect {
            config: self.0.clone(),
            domain: domain.to_owned(),
        })
    }
}

/// One handshake to come.
#[derive(Debug)]
pub struct Connect {
    config: Option<Arc<rustls::ClientConfig>>,
    domain: String,
}

impl<S> TlsConnect<S> for Connect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Stream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            // Not reached when TLS is off: the configuration then says sslmode=disable.
            let config = self
                .config
                .ok_or_else(|| io::Error::other("TLS to the database is off"))?;
            let name = ServerName::try_from(self.domain.clone()).map_err(|error| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{:?} cannot be checked against a certificate ({error}); name the database host by its DNS name or IP address",
                        self.domain
                    ),
                )
            })?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await?;
            Ok(Stream(Box::new(stream)))
        })
    }
}

/// A TLS session with the database.
#[derive(Debug)]
pub struct Stream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(context, buffer)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(context, buffer)
    }

    fn poll_flush(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(context)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(context)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for Stream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // SCRAM without channel binding, as libpq does by default (channel_binding=prefer
        // falls back to none when the client offers none).
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_to_loopback_and_sockets_is_local() {
        let local: tokio_postgres::Config = "postgres://u@127.0.0.1:5432/d".parse().unwrap();
        assert!(!plain_to_remote(&local));
        let local: tokio_postgres::Config = "host=/run/postgresql user=u".parse().unwrap();
        assert!(!plain_to_remote(&local));
        let local: tokio_postgres::Config = "postgres://u@localhost/d".parse().unwrap();
        assert!(!plain_to_remote(&local));
        let remote: tokio_postgres::Config = "postgres://u@db.example.com/d".parse().unwrap();
        assert!(plain_to_remote(&remote));
        let remote: tokio_postgres::Config = "postgres://u@10.0.0.5/d".parse().unwrap();
        assert!(plain_to_remote(&remote));
    }

    #[test]
    fn tls_is_chosen_by_sslmode_or_a_ca_file() {
        let mut config: tokio_postgres::Config = "postgres://u@db/d".parse().unwrap();
        assert!(!StoreTls::choose(&mut config, None).unwrap().is_on());
        assert_eq!(config.get_ssl_mode(), SslMode::Disable);
        let mut config: tokio_postgres::Config =
            "postgres://u@db/d?sslmode=require".parse().unwrap();
        assert!(StoreTls::choose(&mut config, None).unwrap().is_on());
        assert_eq!(config.get_ssl_mode(), SslMode::Require);
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("ca.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let mut config: tokio_postgres::Config = "postgres://u@db/d".parse().unwrap();
        let error = StoreTls::choose(&mut config, Some(&empty)).unwrap_err();
        assert!(
            error.to_string().contains("holds no PEM certificate"),
            "{error}"
        );
    }
}
