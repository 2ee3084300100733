//! `waybill relay` over TLS with authentication, against a private `nats-server` that demands
//! both (a test CA, client certificates, user/password and nkey accounts): the password comes
//! from `--broker-password-file`, never shows in the output, and a file others may read gets a
//! warning; a wrong password and options that do not fit the broker are refused clearly.
#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "../../diesel-backend/tests/common/mod.rs"]
mod common;
#[path = "../../transports/nats/tests/common/mod.rs"]
mod nats_common;
mod support;

use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nats_common::private::{tools, user_nkey, Pki, PrivateServer, TempDir, Tools};
use waybill_inbox_core::{Disposition, IncomingMessage};
use waybill_nats::{ConnectOptions, ConsumerConfig, NatsConsumer};
use waybill_outbox_core::{MessageId, NewOutboxMessage};

const DEADLINE: Duration = Duration::from_secs(60);
const PASSWORD: &str = "relay-pw-9d41e7-never-shown";
const MESSAGES: usize = 12;

struct Setup {
    pki: Pki,
    secrets: TempDir,
    nkey_seed: String,
    server: PrivateServer,
}

fn setup(tools: &Tools) -> Setup {
    let pki = Pki::new(&tools.openssl);
    let (nkey_seed, nkey_public) = user_nkey();
    let config = format!(
        "{}authorization {{\n  users = [\n    {{ user: relay, password: {PASSWORD:?} }}\n    {{ nkey: {nkey_public:?} }}\n  ]\n}}\n",
        pki.tls_block(true)
    );
    let server = PrivateServer::start(tools, &config);
    Setup {
        pki,
        secrets: TempDir::new("waybill-cli-secrets"),
        nkey_seed,
        server,
    }
}

impl Setup {
    /// The relay's flags for the server's TLS.
    fn tls_flags(&self) -> Vec<String> {
        let path = |p: &Path| p.to_string_lossy().into_owned();
        vec![
            "--nats-ca".into(),
            path(&self.pki.ca),
            "--nats-client-cert".into(),
            path(&self.pki.client_cert),
            "--nats-client-key".into(),
            path(&self.pki.client_key),
        ]
    }
}

#[cfg(unix)]
fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn start_relay(db_url: &str, args: &[String]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_waybill"))
        .args(["--database-url", db_url, "relay"])
        .args(args)
        .args(["--poll-interval", "100ms"])
        .env_remove("DATABASE_URL")
        .env_remove("BROKER_URL")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("waybill relay starts")
}

#[test]
fn relay_publishes_over_tls_with_a_password_file_and_a_client_certificate() {
    let Some(tools) = tools() else { return };
    let s = setup(&tools);
    let db = common::sqlite().unwrap();
    let topic = nats_common::unique("tls.orders");
    let messages: Vec<NewOutboxMessage> = (0..MESSAGES)
        .map(|n| NewOutboxMessage::json(&topic, format!("key:{}", n % 3), "Tick", &n).unwrap())
        .collect();
    waybill_diesel::enqueue_all(&mut db.conn(), &messages).unwrap();
    let ids: HashSet<MessageId> = messages.iter().map(NewOutboxMessage::id).collect();

    // Readable by others on purpose: used, with a warning.
    let password_file = s
        .secrets
        .secret("broker-password", &format!("{PASSWORD}\n"));
    chmod(&password_file, 0o644);
    let mut args = vec![
        "--broker-url".to_owned(),
        s.server.url("tls").replace("tls://", "tls://relay@"),
        "--broker-password-file".into(),
        password_file.to_string_lossy().into_owned(),
        "--topics".into(),
        topic.clone(),
    ];
    args.extend(s.tls_flags());
    let relay = start_relay(&db.url, &args);

    // The consumer authenticates with its nkey; the relay created the stream at start.
    let seed_file = s.secrets.secret("consumer.nk", &s.nkey_seed);
    let options = ConnectOptions::default()
        .root_certificates(&s.pki.ca)
        .client_certificate(&s.pki.client_cert, &s.pki.client_key)
        .nkey_seed_file(&seed_file);
    let stream = waybill_nats::sanitize_token(&topic);
    let started = Instant::now();
    let mut consumer = loop {
        match NatsConsumer::connect(
            &s.server.url("tls"),
            ConsumerConfig::new(&stream, "cli-test").connect_options(options.clone()),
        ) {
            Ok(consumer) => break consumer,
            Err(error) => assert!(
                started.elapsed() < DEADLINE,
                "no stream {stream}: {}",
                waybill_outbox_core::error_chain(&error)
            ),
        }
        std::thread::sleep(Duration::from_millis(50)); // polling interval
    };
    let mut seen = HashSet::new();
    while seen.len() < ids.len() && started.elapsed() < DEADLINE {
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
    assert_eq!(seen, ids);

    let (code, stderr) = support::stop_relay(relay, "-TERM", DEADLINE);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains(PASSWORD), "{stderr}");
    assert!(stderr.contains("mode 0644"), "{stderr}");
}

#[test]
fn relay_refuses_a_wrong_password_naming_the_cause_and_misfitting_options() {
    let Some(tools) = tools() else { return };
    let s = setup(&tools);
    let db = common::sqlite().unwrap();
    let wrong = s.secrets.secret("wrong-password", "wrong-pw-never-shown");
    let url = s.server.url("tls").replace("tls://", "tls://relay@");
    let wrong_path = wrong.to_string_lossy().into_owned();
    let mut args = vec![
        "relay",
        "--broker-url",
        &url,
        "--broker-password-file",
        &wrong_path,
    ];
    let tls = s.tls_flags();
    args.extend(tls.iter().map(String::as_str));
    let refused = support::waybill(&db.url, &args, "");
    refused.assert_code(1);
    assert!(
        refused.stderr.contains("refused the credentials"),
        "{refused:?}"
    );
    assert!(
        refused.stderr.contains("relay:***@127.0.0.1"),
        "{refused:?}"
    );
    assert!(
        !refused.stderr.contains("wrong-pw-never-shown"),
        "{refused:?}"
    );

    // A missing password file is named.
    let missing = support::waybill(
        &db.url,
        &[
            "relay",
            "--broker-url",
            &url,
            "--broker-password-file",
            "/nonexistent/pw",
        ],
        "",
    );
    missing.assert_code(1);
    assert!(
        missing
            .stderr
            .contains("broker password file /nonexistent/pw"),
        "{missing:?}"
    );

    // NATS options with another broker, and two NATS authentications, are refused.
    let ca = s.pki.ca.to_string_lossy().into_owned();
    let amqp = support::waybill(
        &db.url,
        &[
            "relay",
            "--broker-url",
            "amqp://127.0.0.1:1/%2f",
            "--nats-ca",
            &ca,
        ],
        "",
    );
    amqp.assert_code(1);
    assert!(
        amqp.stderr.contains("need a nats:// or tls:// broker URL"),
        "{amqp:?}"
    );
    support::waybill(
        &db.url,
        &[
            "relay",
            "--broker-url",
            &url,
            "--nats-creds",
            &ca,
            "--nats-token-file",
            &ca,
        ],
        "",
    )
    .assert_code(2);
}
