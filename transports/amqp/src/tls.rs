//! [`TlsOptions`]: a private CA and a client certificate for `amqps://` connections.

use std::path::{Path, PathBuf};

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};

use crate::{Error, Result};

/// How an `amqps://` connection verifies the broker and proves who it is. `Default` trusts the
/// system's CA certificates and sends no client certificate.
///
/// The server name is always checked against the broker's certificate (the host of the URL).
/// The files are read at each connect, so a renewed certificate is picked up on the next
/// reconnect. With a client certificate, the broker can authenticate the client by it: add
/// `?auth_mechanism=external` to the URL for RabbitMQ's `EXTERNAL` mechanism (its
/// `rabbitmq_auth_mechanism_ssl` plugin).
///
/// ```
/// use waybill_amqp::{PublisherConfig, TlsOptions};
///
/// let tls = TlsOptions::default()
///     .root_certificates("/etc/waybill/rabbitmq-ca.pem")
///     .client_certificate("/etc/waybill/relay.pem", "/etc/waybill/relay-key.pem");
/// let config = PublisherConfig::default().tls(tls);
/// # let _ = config;
/// ```
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    root_certificates: Option<PathBuf>,
    client_certificate: Option<(PathBuf, PathBuf)>,
}

impl TlsOptions {
    /// Trust the CA certificate(s) in this PEM file instead of the system's.
    #[must_use]
    pub fn root_certificates(mut self, pem_file: impl Into<PathBuf>) -> Self {
        self.root_certificates = Some(pem_file.into());
        self
    }

    /// Present this client certificate (PEM, its chain may follow) with its private key
    /// (PEM, PKCS#8 or SEC1).
    #[must_use]
    pub fn client_certificate(
        mut self,
        cert_file: impl Into<PathBuf>,
        key_file: impl Into<PathBuf>,
    ) -> Self {
        self.client_certificate = Some((cert_file.into(), key_file.into()));
        self
    }

    /// lapin's TLS configuration, with the files read now.
    pub(crate) fn load(&self) -> Result<OwnedTLSConfig> {
        let cert_chain = match &self.root_certificates {
            Some(path) => Some(
                String::from_utf8(read("CA certificate file", path)?).map_err(|_| {
                    Error::InvalidFile {
                        what: "CA certificate file",
                        path: path.clone(),
                        reason: "it is not PEM text".into(),
                    }
                })?,
            ),
            None => None,
        };
        let identity = match &self.client_certificate {
            Some((cert, key)) => {
                waybill_outbox_core::warn_if_shared(key);
                Some(OwnedIdentity::PKCS8 {
                    pem: read("client certificate file", cert)?,
                    key: read("client key file", key)?,
                })
            }
            None => None,
        };
        Ok(OwnedTLSConfig {
            identity,
            cert_chain,
        })
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::ReadFile {
        what,
        path: path.to_owned(),
        source,
    })
}
