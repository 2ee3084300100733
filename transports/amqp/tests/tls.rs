//! `amqps://` with a private CA and a client certificate, against RabbitMQ behind a TLS
//! terminator that demands both (certificates made by the test with `openssl`): the right ones
//! publish and consume; a wrong CA, a missing client certificate, plain AMQP on the TLS port and
//! a missing CA file are each refused, naming the cause. And the EXTERNAL mechanism (the client
//! certificate as the login) against a private RabbitMQ node the test starts with only a TLS
//! listener.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{unique, PATIENCE};
use waybill_amqp::{AmqpConsumer, AmqpPublisher, ConsumerConfig, PublisherConfig, TlsOptions};
use waybill_inbox_core::{Disposition, IncomingMessage};
use waybill_outbox_core::{error_chain, Publisher};
use waybill_testkit::outbox::stored;
use waybill_testkit::tls::{openssl, Pki, TlsTerminator};

const MESSAGES: i64 = 10;

/// `AMQP_ADDR` with the scheme `amqps` and the host `localhost:<port>`, credentials and vhost
/// kept; and the host:port the terminator forwards to.
fn tls_addr(addr: &str, port: u16) -> (String, String) {
    let rest = addr
        .strip_prefix("amqp://")
        .expect("AMQP_ADDR starts with amqp://");
    let (credentials, rest) = rest.rsplit_once('@').unwrap_or(("", rest));
    let (host, vhost) = rest.split_once('/').unwrap_or((rest, ""));
    let credentials = if credentials.is_empty() {
        String::new()
    } else {
        format!("{credentials}@")
    };
    (
        format!("amqps://{credentials}localhost:{port}/{vhost}"),
        host.to_owned(),
    )
}

fn refused_publisher(addr: &str, tls: TlsOptions) -> String {
    let config = PublisherConfig::default()
        .connect_timeout(Duration::from_secs(5))
        .tls(tls);
    let error = AmqpPublisher::connect(addr, config).expect_err("refused");
    error_chain(&error)
}

#[test]
fn amqps_with_a_private_ca_and_a_client_certificate_publishes_and_consumes_and_refuses_the_rest() {
    let Some(mut broker) = common::broker() else {
        return;
    };
    let Some(openssl) = openssl() else { return };
    let pki = Pki::new(&openssl);
    let (_, upstream) = tls_addr(&broker.addr, 0);
    let terminator = TlsTerminator::start(&pki, &upstream, true);
    let (addr, _) = tls_addr(&broker.addr, terminator.port());
    let tls = TlsOptions::default()
        .root_certificates(&pki.ca)
        .client_certificate(&pki.client_cert, &pki.client_key);

    let wrong_ca = refused_publisher(
        &addr,
        TlsOptions::default()
            .root_certificates(&pki.wrong_ca)
            .client_certificate(&pki.client_cert, &pki.client_key),
    );
    assert!(wrong_ca.contains("UnknownIssuer"), "{wrong_ca}");
    let no_client_cert = refused_publisher(&addr, TlsOptions::default().root_certificates(&pki.ca));
    assert!(
        no_client_cert.contains("CertificateRequired"),
        "{no_client_cert}"
    );
    let plain = refused_publisher(&addr.replacen("amqps://", "amqp://", 1), tls.clone());
    // The terminator answers plain AMQP with a TLS alert, which is no AMQP frame.
    assert!(plain.contains("failed to parse"), "{plain}");
    let missing = refused_publisher(
        &addr,
        TlsOptions::default().root_certificates(pki.dir.path().join("nope.pem")),
    );
    assert!(
        missing.contains("reading the CA certificate file") && missing.contains("nope.pem"),
        "{missing}"
    );
    for refusal in [&wrong_ca, &no_client_cert, &plain, &missing] {
        assert!(!refusal.contains("guest:guest"), "{refusal}");
    }

    let topic = unique("tls-orders");
    let queue = unique("tls-q");
    broker.cleanup_queue(&queue);
    broker.cleanup_exchange(&topic);
    let mut consumer = AmqpConsumer::connect(
        &addr,
        ConsumerConfig::new(&queue)
            .bind(&topic, "#")
            .tls(tls.clone()),
    )
    .expect("a consumer over TLS");
    let mut publisher =
        AmqpPublisher::connect(&addr, PublisherConfig::default().tls(tls)).expect("TLS");
    let batch: Vec<_> = (1..=MESSAGES)
        .map(|n| stored(n, &topic, &format!("k{}", n % 3), &format!("{{\"n\":{n}}}")))
        .collect();
    assert!(publisher.publish(&batch).iter().all(Result::is_ok));
    let ids: HashSet<_> = batch.iter().map(|m| m.id).collect();
    let mut seen = HashSet::new();
    let started = Instant::now();
    while seen.len() < ids.len() && started.elapsed() < PATIENCE {
        consumer
            .run_once(
                &mut |msg: &IncomingMessage| {
                    seen.insert(msg.id);
                    Disposition::Ack
                },
                100,
                Duration::from_millis(300),
            )
            .expect("a consume over TLS");
    }
    assert_eq!(seen, ids);
}

/// The RabbitMQ server script and `rabbitmqctl` (`RABBITMQ_SBIN_DIR`, else Debian's folder),
/// or `None` after skipping.
fn rabbitmq_programs() -> Option<(PathBuf, PathBuf)> {
    let dir = std::env::var_os("RABBITMQ_SBIN_DIR").map_or("/usr/sbin".into(), PathBuf::from);
    let (server, ctl) = (dir.join("rabbitmq-server"), dir.join("rabbitmqctl"));
    // Debian's scripts run the node as the `rabbitmq` user, which only root can switch to.
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| output.stdout.trim_ascii() == b"0");
    if server.is_file() && ctl.is_file() && root {
        return Some((server, ctl));
    }
    waybill_testkit::skip(
        "a RabbitMQ installation (rabbitmq-server, rabbitmqctl) and root, for a private TLS node",
        "RABBITMQ_SBIN_DIR",
        &format!("not found in {} or not root", dir.display()),
    );
    None
}

/// A private RabbitMQ node with only a TLS listener, which demands a client certificate signed by
/// the test CA and offers only the EXTERNAL mechanism (the certificate's common name is the
/// user, `rabbitmq_auth_mechanism_ssl`). Stopped and removed on drop; the shared broker is not
/// touched.
struct PrivateRabbit {
    node: String,
    ctl: PathBuf,
    port: u16,
    dir: waybill_testkit::tls::TempDir,
    server: std::process::Child,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl PrivateRabbit {
    fn start(server: &Path, ctl: &Path, pki: &Pki) -> Self {
        let dir = waybill_testkit::tls::TempDir::new("waybill-rabbit-tls");
        let (port, dist_port) = (free_port(), free_port());
        let node = format!("{}@localhost", unique("waybill-tls"));
        let path = |name: &str| dir.path().join(name);
        for (from, to) in [
            (&pki.ca, "ca.pem"),
            (&pki.server_cert, "server.pem"),
            (&pki.server_key, "server-key.pem"),
        ] {
            std::fs::copy(from, path(to)).unwrap();
        }
        std::fs::write(
            path("rabbitmq.conf"),
            format!(
                "listeners.tcp = none\n\
                 listeners.ssl.default = 127.0.0.1:{port}\n\
                 ssl_options.cacertfile = {ca}\n\
                 ssl_options.certfile = {cert}\n\
                 ssl_options.keyfile = {key}\n\
                 ssl_options.verify = verify_peer\n\
                 ssl_options.fail_if_no_peer_cert = true\n\
                 auth_mechanisms.1 = EXTERNAL\n\
                 ssl_cert_login_from = common_name\n\
                 loopback_users = none\n",
                ca = path("ca.pem").display(),
                cert = path("server.pem").display(),
                key = path("server-key.pem").display(),
            ),
        )
        .unwrap();
        std::fs::write(path("enabled_plugins"), "[rabbitmq_auth_mechanism_ssl].\n").unwrap();
        // Run as root, the scripts switch to the `rabbitmq` user, which must read the files.
        let _ = Command::new("chown")
            .args(["-R", "rabbitmq:"])
            .arg(dir.path())
            .status();
        let env = [
            ("RABBITMQ_NODENAME", node.clone()),
            ("RABBITMQ_DIST_PORT", dist_port.to_string()),
            (
                "RABBITMQ_CONFIG_FILE",
                path("rabbitmq.conf").display().to_string(),
            ),
            ("RABBITMQ_MNESIA_BASE", path("mnesia").display().to_string()),
            ("RABBITMQ_LOG_BASE", path("log").display().to_string()),
            (
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                path("enabled_plugins").display().to_string(),
            ),
            ("RABBITMQ_PID_FILE", path("pid").display().to_string()),
        ];
        let server = Command::new(server)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let rabbit = Self {
            node,
            ctl: ctl.to_owned(),
            port,
            dir,
            server,
        };
        let pid = rabbit.dir.path().join("pid");
        rabbit.ctl(&["wait", &pid.display().to_string(), "--timeout", "60"]);
        rabbit
    }

    /// Runs `rabbitmqctl -n <node> args`, which must succeed.
    fn ctl(&self, args: &[&str]) {
        let output = Command::new(&self.ctl)
            .args(["-n", &self.node])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "rabbitmqctl {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// An `amqps://` URL to the node asking for the EXTERNAL mechanism, without credentials.
    fn external_url(&self) -> String {
        format!(
            "amqps://localhost:{}/%2f?auth_mechanism=external",
            self.port
        )
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        let _ = Command::new(&self.ctl)
            .args(["-n", &self.node, "stop"])
            .stdin(Stdio::null())
            .output();
        let _ = self.server.wait();
    }
}

#[test]
fn external_mechanism_logs_in_with_the_client_certificate_alone() {
    let Some((server, ctl)) = rabbitmq_programs() else {
        return;
    };
    let Some(openssl) = openssl() else { return };
    let pki = Pki::new(&openssl);
    let rabbit = PrivateRabbit::start(&server, &ctl, &pki);
    let url = rabbit.external_url();
    let tls = TlsOptions::default()
        .root_certificates(&pki.ca)
        .client_certificate(&pki.client_cert, &pki.client_key);

    // The certificate's common name is no user yet: the login is refused.
    let unknown = refused_publisher(&url, tls.clone());
    assert!(
        unknown.contains("ACCESS_REFUSED") || unknown.contains("refused"),
        "{unknown}"
    );
    // Without a client certificate the node refuses the handshake itself.
    let no_client_cert = refused_publisher(&url, TlsOptions::default().root_certificates(&pki.ca));
    assert!(
        no_client_cert.contains("CertificateRequired"),
        "{no_client_cert}"
    );

    // The user the certificate names, with no password anyone knows: the certificate is the login.
    let user = "waybill test client";
    rabbit.ctl(&["add_user", user, &unique("unused-password")]);
    rabbit.ctl(&["set_permissions", "-p", "/", user, ".*", ".*", ".*"]);
    let topic = unique("external");
    let queue = unique("external-q");
    let mut consumer = AmqpConsumer::connect(
        &url,
        ConsumerConfig::new(&queue)
            .bind(&topic, "#")
            .tls(tls.clone()),
    )
    .expect("a consumer logged in by its certificate");
    let mut publisher =
        AmqpPublisher::connect(&url, PublisherConfig::default().tls(tls)).expect("EXTERNAL");
    let batch: Vec<_> = (1..=MESSAGES)
        .map(|n| stored(n, &topic, &format!("k{}", n % 3), &format!("{{\"n\":{n}}}")))
        .collect();
    assert!(publisher.publish(&batch).iter().all(Result::is_ok));
    let ids: HashSet<_> = batch.iter().map(|m| m.id).collect();
    let mut seen = HashSet::new();
    let started = Instant::now();
    while seen.len() < ids.len() && started.elapsed() < PATIENCE {
        consumer
            .run_once(
                &mut |msg: &IncomingMessage| {
                    seen.insert(msg.id);
                    Disposition::Ack
                },
                100,
                Duration::from_millis(300),
            )
            .expect("a consume over TLS");
    }
    assert_eq!(seen, ids);
}
