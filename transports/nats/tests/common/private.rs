//! A private `nats-server` for one test, on a loopback port of its own, with a generated
//! configuration (TLS with certificates made by the test through the `openssl` CLI, accounts,
//! JetStream in a temporary store). The shared server on 4222 is never touched.
//!
//! `nats-server` is looked up as `NATS_SERVER_BIN`, then `/usr/sbin/nats-server`, then on the
//! `PATH`; `openssl` on the `PATH`. When either is missing the test is skipped with one line,
//! unless `WAYBILL_REQUIRE_SERVERS=1`, which turns the skip into a failure.

use std::fmt::Write as _;
use std::io::Read as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

// Re-exported for the suites that make certificates; not every suite does.
#[allow(unused_imports)]
pub use waybill_testkit::tls::{owner_only, Pki, TempDir};
/// The programs the private servers need, or `None` after skipping (one line naming what is
/// missing) when they are not installed.
pub struct Tools {
    pub nats_server: PathBuf,
    pub openssl: PathBuf,
}

pub fn tools() -> Option<Tools> {
    let nats_server = match std::env::var_os("NATS_SERVER_BIN") {
        Some(path) => Some(PathBuf::from(path)).filter(|p| p.is_file()),
        None => Some(PathBuf::from("/usr/sbin/nats-server"))
            .filter(|p| p.is_file())
            .or_else(|| on_path("nats-server")),
    };
    let Some(nats_server) = nats_server else {
        waybill_testkit::skip(
            "nats-server (for a private TLS server)",
            "NATS_SERVER_BIN",
            &"nats-server is not installed (NATS_SERVER_BIN, /usr/sbin, PATH)",
        );
        return None;
    };
    let Some(openssl) = on_path("openssl") else {
        waybill_testkit::skip(
            "openssl (for the test certificates)",
            "PATH",
            &"the openssl CLI is not installed",
        );
        return None;
    };
    Some(Tools {
        nats_server,
        openssl,
    })
}

use waybill_testkit::tls::on_path;

/// A running private `nats-server`, killed (and its store removed) on drop.
pub struct PrivateServer {
    child: Child,
    pub port: u16,
    dir: TempDir,
}

impl PrivateServer {
    /// Starts `nats-server` with JetStream in a temporary store, listening on a free loopback
    /// port, with `config` (TLS and authorization blocks) added, and waits until it accepts
    /// connections.
    pub fn start(tools: &Tools, config: &str) -> Self {
        let dir = TempDir::new("waybill-nats-server");
        let port = free_port();
        let mut conf = String::new();
        writeln!(conf, "listen: \"127.0.0.1:{port}\"").unwrap();
        writeln!(
            conf,
            "jetstream {{\n  store_dir: {:?}\n}}",
            dir.path().join("js")
        )
        .unwrap();
        conf.push_str(config);
        let conf_path = dir.path().join("server.conf");
        std::fs::write(&conf_path, conf).expect("the server's config");
        let log = std::fs::File::create(dir.path().join("server.log")).expect("a log file");
        let child = Command::new(&tools.nats_server)
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("a log file handle"))
            .stderr(log)
            .spawn()
            .expect("starting nats-server");
        let mut server = Self { child, port, dir };
        server.wait_until_listening();
        server
    }

    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The server's log so far, for assertion messages.
    pub fn log(&self) -> String {
        let mut log = String::new();
        if let Ok(mut file) = std::fs::File::open(self.dir.path().join("server.log")) {
            let _ = file.read_to_string(&mut log);
        }
        log
    }

    /// Polls the port until the server accepts a connection: readiness of another process,
    /// with a deadline far beyond any start-up; a server that exits fails the test with its log.
    fn wait_until_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("nats-server exited ({status}) at start:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen within 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port nothing listens on now (the OS picks it; the server binds it right after).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("a free port");
    listener.local_addr().expect("its address").port()
}

/// A new user nkey: (seed, public key).
pub fn user_nkey() -> (String, String) {
    let pair = nkeys::KeyPair::new_user();
    (pair.seed().expect("the seed"), pair.public_key())
}

/// An operator-mode setup: an operator, a system account, one account (JetStream allowed) and
/// a user of it, as `nsc` would make them, signed here with nkeys. `server_config` trusts the operator and
/// preloads the account; `creds` is the user's credentials file content.
pub struct Operator {
    pub server_config: String,
    pub creds: String,
}

impl Operator {
    pub fn new() -> Self {
        let operator = nkeys::KeyPair::new_operator();
        let account = nkeys::KeyPair::new_account();
        // JetStream in operator mode needs a system account.
        let system = nkeys::KeyPair::new_account();
        let user = nkeys::KeyPair::new_user();
        let operator_jwt = jwt(
            &operator,
            &operator.public_key(),
            "test-operator",
            serde_json::json!({"type": "operator", "version": 2}),
        );
        let account_jwt = jwt(
            &operator,
            &account.public_key(),
            "test-account",
            serde_json::json!({"type": "account", "version": 2, "limits": {
                "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                "wildcards": true, "conn": -1, "leaf": -1,
                "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1
            }}),
        );
        let system_jwt = jwt(
            &operator,
            &system.public_key(),
            "SYS",
            serde_json::json!({"type": "account", "version": 2, "limits": {
                "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                "wildcards": true, "conn": -1, "leaf": -1
            }}),
        );
        let user_jwt = jwt(
            &account,
            &user.public_key(),
            "test-user",
            serde_json::json!({"type": "user", "version": 2, "pub": {}, "sub": {},
                "subs": -1, "data": -1, "payload": -1}),
        );
        let server_config = format!(
            "operator: {operator_jwt:?}\nsystem_account: {}\nresolver: MEMORY\n\
             resolver_preload: {{\n  {}: {account_jwt:?}\n  {}: {system_jwt:?}\n}}\n",
            system.public_key(),
            account.public_key(),
            system.public_key()
        );
        let creds = format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().expect("the seed")
        );
        Self {
            server_config,
            creds,
        }
    }
}

/// A NATS JWT: `claims` under `nats`, for `subject`, signed by `issuer`.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    let header = base64url(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = serde_json::json!({
        "jti": waybill_testkit::unique("jti").replace(['-', '_'], "").to_uppercase(),
        "iat": 1_700_000_000,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let claims = base64url(claims.to_string().as_bytes());
    let signed = format!("{header}.{claims}");
    let signature = issuer.sign(signed.as_bytes()).expect("a signature");
    format!("{signed}.{}", base64url(&signature))
}

/// Base64 with the URL alphabet, no padding (what JWTs use).
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}
