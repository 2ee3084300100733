//! `waybill` against a private MariaDB server that demands TLS (`require_secure_transport`, a
//! test CA, a user created `REQUIRE SSL`): reached with `ssl_mode=verify_identity` and the CA in
//! `ssl_ca`, `migrate`, an enqueue and `status` work; a CA that did not sign the server's
//! certificate and a connection without TLS are each refused, and the password never shows.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod support;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use diesel::{Connection, MysqlConnection};
use waybill_outbox_core::NewOutboxMessage;
use waybill_testkit::tls::{openssl, owner_only, Pki, TempDir};

const DEADLINE: Duration = Duration::from_secs(60);
const PASSWORD: &str = "my-pw-7d21e9-never-shown";
const MESSAGES: usize = 5;

/// `mariadb-install-db` and `mariadbd`: `MARIADB_BIN_DIR`, else Debian's places. `None`
/// (skipped, naming the variable) when there are none.
fn mariadb_programs() -> Option<(PathBuf, PathBuf)> {
    let dirs: Vec<PathBuf> = match std::env::var_os("MARIADB_BIN_DIR") {
        Some(dir) => vec![PathBuf::from(dir)],
        None => vec!["/usr/bin".into(), "/usr/sbin".into()],
    };
    let find = |name: &str| dirs.iter().map(|dir| dir.join(name)).find(|p| p.is_file());
    let found = find("mariadb-install-db").zip(find("mariadbd"));
    if found.is_none() {
        waybill_testkit::skip(
            "MariaDB server programs (mariadb-install-db, mariadbd) for a private TLS server",
            "MARIADB_BIN_DIR",
            &"not found in MARIADB_BIN_DIR, /usr/bin or /usr/sbin",
        );
    }
    found
}

/// Whether this process is root: the server then runs as the `mysql` user.
fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| output.stdout.trim_ascii() == b"0")
}

/// A private MariaDB server on a free loopback port that accepts only TLS; stopped and removed
/// on drop.
struct PrivateMariaDb {
    server: Child,
    port: u16,
    dir: TempDir,
}

impl PrivateMariaDb {
    fn start(install_db: &Path, mariadbd: &Path, pki: &Pki) -> Self {
        let dir = TempDir::new("waybill-mysql-tls");
        let data = dir.path().join("data");
        let (cert, key) = (
            dir.path().join("server.pem"),
            dir.path().join("server-key.pem"),
        );
        std::fs::copy(&pki.server_cert, &cert).unwrap();
        std::fs::copy(&pki.server_key, &key).unwrap();
        owner_only(&key);
        let user = if is_root() {
            let status = Command::new("chown")
                .args(["-R", "mysql:"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success(), "chown {}", dir.path().display());
            vec!["--user=mysql".to_owned()]
        } else {
            Vec::new()
        };
        let output = Command::new(install_db)
            .args(&user)
            .arg(format!("--datadir={}", data.display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "mariadb-install-db: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let socket = dir.path().join("mysqld.sock");
        // The first connection, to create the test's user, comes over the socket: TCP only
        // takes TLS, and root has no password.
        let init = dir.path().join("init.sql");
        std::fs::write(
            &init,
            // One statement per line: an init file is read line by line.
            format!(
                "CREATE DATABASE waybill;\n\
                 CREATE USER 'waybill'@'%' IDENTIFIED BY '{PASSWORD}' REQUIRE SSL;\n\
                 GRANT ALL ON waybill.* TO 'waybill'@'%';\n"
            ),
        )
        .unwrap();
        let server = Command::new(mariadbd)
            .arg("--no-defaults")
            .args(&user)
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--port={port}"))
            .args(["--bind-address=127.0.0.1", "--skip-name-resolve"])
            .arg(format!("--init-file={}", init.display()))
            .arg(format!("--ssl-ca={}", pki.ca.display()))
            .arg(format!("--ssl-cert={}", cert.display()))
            .arg(format!("--ssl-key={}", key.display()))
            .arg("--require-secure-transport=ON")
            .arg(format!("--pid-file={}", dir.path().join("pid").display()))
            .arg(format!(
                "--log-error={}",
                dir.path().join("error.log").display()
            ))
            .arg("--innodb-buffer-pool-size=16M")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut mariadb = Self { server, port, dir };
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = mariadb.server.try_wait().unwrap() {
                let log = std::fs::read_to_string(mariadb.dir.path().join("error.log"));
                panic!("the private MariaDB exited ({status}): {log:?}");
            }
            assert!(
                started.elapsed() < DEADLINE,
                "the private MariaDB never listened"
            );
            std::thread::sleep(Duration::from_millis(50)); // polling interval
        }
        mariadb
    }

    /// A URL to the test's database with `ssl_mode` and, if given, `ssl_ca`.
    fn url(&self, ssl_mode: &str, ca: Option<&Path>) -> String {
        let ca = ca.map_or(String::new(), |ca| format!("&ssl_ca={}", ca.display()));
        format!(
            "mysql://waybill:{PASSWORD}@127.0.0.1:{}/waybill?ssl_mode={ssl_mode}{ca}",
            self.port
        )
    }
}

impl Drop for PrivateMariaDb {
    fn drop(&mut self) {
        // SIGTERM to the server (it runs as its own process, not under runuser): a clean stop.
        let _ = Command::new("kill")
            .args(["-TERM", &self.server.id().to_string()])
            .status();
        let _ = self.server.wait();
    }
}

#[test]
fn waybill_reaches_mysql_over_verified_tls_and_refuses_what_it_cannot_verify() {
    let Some(openssl) = openssl() else { return };
    let Some((install_db, mariadbd)) = mariadb_programs() else {
        return;
    };
    let pki = Pki::new(&openssl);
    let server = PrivateMariaDb::start(&install_db, &mariadbd, &pki);

    // Refused, each naming its cause: a CA that did not sign the server's certificate, and no
    // TLS at all (the server requires secure transport).
    let wrong_ca = support::waybill(
        &server.url("verify_identity", Some(&pki.wrong_ca)),
        &["status"],
        "",
    );
    wrong_ca.assert_code(1);
    assert!(
        wrong_ca.stderr.to_lowercase().contains("certificate"),
        "{wrong_ca:?}"
    );
    let plain = support::waybill(&server.url("disabled", None), &["status"], "");
    plain.assert_code(1);
    assert!(
        plain.stderr.contains("Access denied") || plain.stderr.contains("insecure transport"),
        "{plain:?}"
    );
    for refused in [&wrong_ca, &plain] {
        assert!(!refused.stderr.contains(PASSWORD), "{refused:?}");
    }

    // Verified: migrate, enqueue over the same URL, and see the messages pending.
    let url = server.url("verify_identity", Some(&pki.ca));
    support::waybill(&url, &["migrate"], "").assert_code(0);
    let mut conn = MysqlConnection::establish(&url).unwrap();
    let messages: Vec<NewOutboxMessage> = (0..MESSAGES)
        .map(|n| NewOutboxMessage::json("mytls.orders", format!("key:{n}"), "Tick", &n).unwrap())
        .collect();
    waybill_diesel::enqueue_all(&mut conn, &messages).unwrap();
    let status = support::waybill(&url, &["status", "--json"], "");
    status.assert_code(0);
    assert!(!status.stdout.contains(PASSWORD), "{status:?}");
    let topics = status.json()["topics"].clone();
    let orders = topics.as_array().and_then(|topics| {
        topics
            .iter()
            .find(|t| t["topic"] == "mytls.orders")
            .map(|t| t["pending"].as_i64())
    });
    assert_eq!(orders, Some(Some(MESSAGES as i64)), "{status:?}");
}
