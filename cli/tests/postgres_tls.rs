//! `waybill` against a private PostgreSQL cluster that demands TLS and a password (`initdb` into
//! a temporary folder, `ssl=on`, a test CA, `hostssl ... scram-sha-256` only): reached with
//! `sslmode=verify-full`, the password read by libpq from a `passfile`, the relay publishes to a
//! private `nats-server` over TLS with a client certificate; a wrong root certificate, a server
//! name the certificate does not carry, and a connection without TLS are each refused, naming
//! the cause, and the password never shows.
#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "../../transports/nats/tests/common/mod.rs"]
mod nats_common;
mod support;

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use diesel::{Connection, PgConnection};
use nats_common::private::{owner_only, tools, Pki, PrivateServer, TempDir};
use waybill_inbox_core::{Disposition, IncomingMessage};
use waybill_nats::{ConnectOptions, ConsumerConfig, NatsConsumer};
use waybill_outbox_core::{MessageId, NewOutboxMessage};

const DEADLINE: Duration = Duration::from_secs(60);
const PASSWORD: &str = "pg-pw-51c0a2-never-shown";
const MESSAGES: usize = 12;

/// `initdb` and `postgres` of the installed server: `PG_BIN_DIR`, or Debian's folder of the
/// newest version. `None` (skipped, naming the variable) when there is none.
fn pg_bin_dir() -> Option<PathBuf> {
    let found = match std::env::var_os("PG_BIN_DIR") {
        Some(dir) => Some(PathBuf::from(dir)),
        None => std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|versions| {
                versions
                    .filter_map(|entry| Some(entry.ok()?.path().join("bin")))
                    .filter(|bin| bin.join("initdb").is_file())
                    .max()
            }),
    };
    let found = found.filter(|bin| bin.join("initdb").is_file() && bin.join("postgres").is_file());
    if found.is_none() {
        waybill_testkit::skip(
            "PostgreSQL server binaries (initdb, postgres) for a private TLS cluster",
            "PG_BIN_DIR",
            &"no initdb under PG_BIN_DIR or /usr/lib/postgresql/*/bin",
        );
    }
    found
}

/// Runs a server program as the `postgres` user when this process is root (initdb and
/// postgres refuse to run as root), else as this user.
fn server_command(program: &Path) -> Command {
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| output.stdout.trim_ascii() == b"0")
}

/// Hands `path` to the server's user when running as root.
fn give_to_server(path: &Path) {
    if is_root() {
        let status = Command::new("chown")
            .args(["-R", "postgres:"])
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success(), "chown {}", path.display());
    }
}

/// A private PostgreSQL cluster on a free loopback port that accepts only TLS connections
/// with a password; stopped and removed on drop.
struct PrivatePostgres {
    server: Child,
    port: u16,
    dir: TempDir,
}

impl PrivatePostgres {
    fn start(bin: &Path, pki: &Pki) -> Self {
        let dir = TempDir::new("waybill-pg-tls");
        let data = dir.path().join("data");
        let pwfile = dir.secret("initdb-pw", PASSWORD);
        // The server's key must be the server user's and private.
        let (cert, key) = (
            dir.path().join("server.pem"),
            dir.path().join("server-key.pem"),
        );
        std::fs::copy(&pki.server_cert, &cert).unwrap();
        std::fs::copy(&pki.server_key, &key).unwrap();
        owner_only(&key);
        give_to_server(dir.path());
        let output = server_command(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "waybill", "--auth=scram-sha-256", "--pwfile"])
            .arg(&pwfile)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        // TLS with a password, or nothing: no `host` line, no local socket.
        std::fs::write(
            data.join("pg_hba.conf"),
            "hostssl all all 127.0.0.1/32 scram-sha-256\n",
        )
        .unwrap();
        give_to_server(&data);
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = server_command(&bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "unix_socket_directories=",
            ])
            .args(["-c", &format!("port={port}"), "-c", "ssl=on"])
            .args(["-c", &format!("ssl_cert_file={}", cert.display())])
            .args(["-c", &format!("ssl_key_file={}", key.display())])
            .args(["-c", "fsync=off"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let cluster = Self { server, port, dir };
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < DEADLINE,
                "the private PostgreSQL never listened"
            );
            std::thread::sleep(Duration::from_millis(50)); // polling interval
        }
        cluster
    }

    /// A URL naming the server `host` (reached at 127.0.0.1 whatever the name) with `sslmode`
    /// and `sslrootcert`, the password in a `passfile`.
    fn url(&self, host: &str, sslmode: &str, root: &Path) -> String {
        let passfile = self
            .dir
            .secret("pgpass", &format!("*:{}:*:waybill:{PASSWORD}\n", self.port));
        format!(
            "postgres://waybill@{host}:{}/postgres?hostaddr=127.0.0.1&sslmode={sslmode}&sslrootcert={}&passfile={}",
            self.port,
            root.display(),
            passfile.display()
        )
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        // SIGINT to the postmaster (not to `runuser`): a fast shutdown.
        let postmaster = std::fs::read_to_string(self.dir.path().join("data/postmaster.pid"))
            .ok()
            .and_then(|pid| pid.lines().next().map(str::to_owned));
        if let Some(pid) = postmaster {
            let _ = Command::new("kill").args(["-INT", &pid]).status();
        }
        let _ = self.server.wait();
    }
}

#[test]
fn relay_runs_over_tls_to_postgres_and_nats_and_refuses_what_it_cannot_verify() {
    let Some(tools) = tools() else { return };
    let Some(bin) = pg_bin_dir() else { return };
    let pki = Pki::new(&tools.openssl);
    let pg = PrivatePostgres::start(&bin, &pki);
    let url = pg.url("127.0.0.1", "verify-full", &pki.ca);

    // Refused, each naming its cause: a root certificate that did not sign the server's, a
    // host name the server's certificate does not carry, and no TLS at all.
    let wrong_ca = support::waybill(
        &pg.url("127.0.0.1", "verify-full", &pki.wrong_ca),
        &["status"],
        "",
    );
    wrong_ca.assert_code(1);
    assert!(
        wrong_ca.stderr.contains("certificate verify failed"),
        "{wrong_ca:?}"
    );
    let wrong_name = support::waybill(
        &pg.url("db.example", "verify-full", &pki.ca),
        &["status"],
        "",
    );
    wrong_name.assert_code(1);
    assert!(
        wrong_name.stderr.contains("does not match host name"),
        "{wrong_name:?}"
    );
    let plain = support::waybill(&pg.url("127.0.0.1", "disable", &pki.ca), &["status"], "");
    plain.assert_code(1);
    assert!(plain.stderr.contains("no encryption"), "{plain:?}");
    for refused in [&wrong_ca, &wrong_name, &plain] {
        assert!(!refused.stderr.contains(PASSWORD), "{refused:?}");
    }

    // Verified: migrate, enqueue, and relay to a private NATS over TLS with a client certificate.
    support::waybill(&url, &["migrate"], "").assert_code(0);
    let nats = PrivateServer::start(&tools, &pki.tls_block(true));
    let topic = nats_common::unique("pgtls.orders");
    let messages: Vec<NewOutboxMessage> = (0..MESSAGES)
        .map(|n| NewOutboxMessage::json(&topic, format!("key:{}", n % 3), "Tick", &n).unwrap())
        .collect();
    let mut conn = PgConnection::establish(&url).unwrap();
    waybill_diesel::enqueue_all(&mut conn, &messages).unwrap();
    let ids: HashSet<MessageId> = messages.iter().map(NewOutboxMessage::id).collect();
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let relay = Command::new(env!("CARGO_BIN_EXE_waybill"))
        .args(["--database-url", &url, "relay", "--broker-url"])
        .arg(nats.url("tls"))
        .args(["--topics", &topic, "--poll-interval", "100ms"])
        .args(["--nats-ca", &path(&pki.ca)])
        .args(["--nats-client-cert", &path(&pki.client_cert)])
        .args(["--nats-client-key", &path(&pki.client_key)])
        .env_remove("DATABASE_URL")
        .env_remove("BROKER_URL")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("waybill relay starts");

    let options = ConnectOptions::default()
        .root_certificates(&pki.ca)
        .client_certificate(&pki.client_cert, &pki.client_key);
    let stream = waybill_nats::sanitize_token(&topic);
    let started = Instant::now();
    let mut seen = HashSet::new();
    let mut consumer = None;
    while seen.len() < ids.len() && started.elapsed() < DEADLINE {
        // The relay creates the stream when it starts.
        let Some(consumer) = consumer.as_mut() else {
            consumer = NatsConsumer::connect(
                &nats.url("tls"),
                ConsumerConfig::new(&stream, "pg-tls-test").connect_options(options.clone()),
            )
            .ok();
            std::thread::sleep(Duration::from_millis(50)); // polling interval
            continue;
        };
        consumer
            .run_once(
                &mut |msg: &IncomingMessage| {
                    seen.insert(msg.id);
                    Disposition::Ack
                },
                100,
                Duration::from_millis(300),
            )
            .expect("a pull");
    }
    let (code, stderr) = support::stop_relay(relay, "-TERM", DEADLINE);
    assert_eq!(seen, ids, "{stderr}");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains(PASSWORD), "{stderr}");
    let status = support::waybill(&url, &["status"], "");
    status.assert_code(0);
    assert!(!status.stdout.contains(PASSWORD), "{status:?}");
}
