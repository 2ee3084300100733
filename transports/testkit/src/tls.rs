//! Certificates and TLS for tests against servers that demand it: a private CA made with the
//! `openssl` CLI ([`Pki`]), a [`TlsTerminator`] that puts TLS in front of a plain server, and
//! a [`TempDir`] for the files.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use tokio_rustls::rustls::{self, pki_types};

/// A folder under the system's temp dir, removed (with everything in it) on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new folder named after `prefix` and a unique suffix.
    pub fn new(prefix: &str) -> Self {
        let path = std::env::temp_dir().join(crate::unique(prefix));
        std::fs::create_dir_all(&path).expect("a temp dir");
        Self(path)
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `content` to `name` in the folder, owner-only, and returns its path.
    pub fn secret(&self, name: &str, content: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, content).expect("a secret file");
        owner_only(&path);
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Makes `path` readable and writable by its owner only (a server refuses a shared key).
#[cfg(unix)]
pub fn owner_only(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
}

/// Nothing to do off Unix.
#[cfg(not(unix))]
pub fn owner_only(_path: &Path) {}

/// `openssl` on the `PATH`, or `None` after skipping (one line) when it is not installed.
pub fn openssl() -> Option<PathBuf> {
    let found = on_path("openssl");
    if found.is_none() {
        crate::skip(
            "openssl (for the test certificates)",
            "PATH",
            &"the openssl CLI is not installed",
        );
    }
    found
}

/// `program` in a folder of the `PATH`.
pub fn on_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}

/// A private CA, a server certificate for `127.0.0.1` / `localhost` and a client certificate
/// it signed, and a second CA that signed nothing here (the wrong CA).
#[derive(Debug)]
pub struct Pki {
    /// The folder of every file below.
    pub dir: TempDir,
    /// The CA certificate (PEM).
    pub ca: PathBuf,
    /// Another CA's certificate, which signed nothing here.
    pub wrong_ca: PathBuf,
    /// The server certificate, for `127.0.0.1` and `localhost`.
    pub server_cert: PathBuf,
    /// Its key (PKCS#8 PEM, owner-only).
    pub server_key: PathBuf,
    /// A client certificate the CA signed.
    pub client_cert: PathBuf,
    /// Its key (PKCS#8 PEM, owner-only).
    pub client_key: PathBuf,
}

impl Pki {
    /// Makes the certificates with the `openssl` CLI.
    pub fn new(openssl: &Path) -> Self {
        let dir = TempDir::new("waybill-nats-pki");
        let file = |name: &str| dir.path().join(name);
        let run = |args: &[&str]| {
            let output = Command::new(openssl)
                .args(args)
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .output()
                .expect("running openssl");
            assert!(
                output.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for ca in ["ca", "wrong-ca"] {
            let subject = format!("/CN=waybill test {ca}");
            let (key, cert) = (format!("{ca}-key.pem"), format!("{ca}.pem"));
            let mut args = vec!["req", "-x509"];
            args.extend(ec);
            args.extend([
                "-keyout", &key, "-out", &cert, "-days", "2", "-subj", &subject,
            ]);
            run(&args);
        }
        for (name, usage) in [("server", "serverAuth"), ("client", "clientAuth")] {
            let ext = format!(
                "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage={usage}\n\
                 subjectAltName=IP:127.0.0.1,DNS:localhost\n"
            );
            std::fs::write(file(&format!("{name}.ext")), ext).expect("an extension file");
            let (key, csr, cert, ext) = (
                format!("{name}-key.pem"),
                format!("{name}.csr"),
                format!("{name}.pem"),
                format!("{name}.ext"),
            );
            let subject = format!("/CN=waybill test {name}");
            let mut args = vec!["req"];
            args.extend(ec);
            args.extend(["-keyout", &key, "-out", &csr, "-subj", &subject]);
            run(&args);
            run(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca-key.pem",
                "-set_serial",
                if name == "server" { "1001" } else { "1002" },
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &cert,
            ]);
            owner_only(&file(&key));
        }
        Self {
            ca: file("ca.pem"),
            wrong_ca: file("wrong-ca.pem"),
            server_cert: file("server.pem"),
            server_key: file("server-key.pem"),
            client_cert: file("client.pem"),
            client_key: file("client-key.pem"),
            dir,
        }
    }

    /// A `nats-server` configuration's `tls` block: its certificate, and with `verify_clients` it demands a
    /// client certificate signed by the CA.
    pub fn tls_block(&self, verify_clients: bool) -> String {
        format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: {verify_clients}\n  timeout: 5\n}}\n",
            self.server_cert, self.server_key, self.ca
        )
    }
}

/// TLS in front of a plain TCP server: accepts TLS on a free loopback port with the [`Pki`]'s
/// server certificate and forwards the decrypted bytes to `upstream`. Stops when dropped.
#[derive(Debug)]
pub struct TlsTerminator {
    port: u16,
    // Dropping the runtime stops the listener and every connection.
    _runtime: tokio::runtime::Runtime,
}

impl TlsTerminator {
    /// Starts the terminator; with `verify_clients` it demands a client certificate the
    /// [`Pki`]'s CA signed.
    pub fn start(pki: &Pki, upstream: &str, verify_clients: bool) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if verify_clients {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(certificates(&pki.ca).remove(0)).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let key = <pki_types::PrivateKeyDer<'static> as pki_types::pem::PemObject>::from_pem_file(
            &pki.server_key,
        )
        .unwrap();
        let config = builder
            .with_single_cert(certificates(&pki.server_cert), key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(SocketAddr::from((
                Ipv4Addr::LOCALHOST,
                0,
            ))))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let upstream = upstream.to_owned();
        runtime.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
                tokio::spawn(async move {
                    // A failed handshake is the client's refusal to see: just close.
                    let Ok(mut client) = acceptor.accept(client).await else {
                        return;
                    };
                    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
        Self {
            port,
            _runtime: runtime,
        }
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }
}

fn certificates(path: &Path) -> Vec<pki_types::CertificateDer<'static>> {
    <pki_types::CertificateDer<'static> as pki_types::pem::PemObject>::pem_file_iter(path)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}
