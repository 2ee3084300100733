//! Secure connections against private `nats-server`s that demand them: TLS with a test CA,
//! client certificates, user/password, nkey and token accounts. The right credentials and CA
//! publish and consume end to end; a wrong password, a wrong CA, a missing client certificate
//! and a plain server under `require_tls` are each refused with a typed error that names the
//! cause and shows no secret.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use waybill_inbox_core::{Disposition, IncomingMessage};
use waybill_nats::{
    ConnectFailure, ConnectOptions, ConsumerConfig, Error, NatsConsumer, NatsPublisher,
    PublisherConfig,
};
use waybill_outbox_core::{error_chain, Publisher};

use common::private::{tools, user_nkey, Operator, Pki, PrivateServer, TempDir, Tools};
use common::{consume_until, message, unique};

const USER: &str = "relay";
const PASSWORD: &str = "pw-5f2a9c-never-shown";
const TOKEN: &str = "tok-77e1b3-never-shown";

/// A server with TLS that verifies client certificates, a user/password account and an nkey
/// account, and JetStream.
struct Secured {
    pki: Pki,
    secrets: TempDir,
    nkey_seed: String,
    server: PrivateServer,
}

fn secured(tools: &Tools) -> Secured {
    let pki = Pki::new(&tools.openssl);
    let (nkey_seed, nkey_public) = user_nkey();
    let config = format!(
        "{}authorization {{\n  users = [\n    {{ user: {USER:?}, password: {PASSWORD:?} }}\n    {{ nkey: {nkey_public:?} }}\n  ]\n}}\n",
        pki.tls_block(true)
    );
    let server = PrivateServer::start(tools, &config);
    Secured {
        pki,
        secrets: TempDir::new("waybill-nats-secrets"),
        nkey_seed,
        server,
    }
}

impl Secured {
    /// TLS as the server wants it: the test CA and the client certificate.
    fn tls(&self) -> ConnectOptions {
        ConnectOptions::default()
            .root_certificates(&self.pki.ca)
            .client_certificate(&self.pki.client_cert, &self.pki.client_key)
    }
}

/// The error's full chain, checked to show no secret.
fn checked(error: &Error) -> String {
    let shown = format!("{} / {error:?}", error_chain(error));
    for secret in [PASSWORD, TOKEN] {
        assert!(!shown.contains(secret), "a secret in {shown}");
    }
    shown
}

fn cause(error: &Error) -> ConnectFailure {
    match error {
        Error::Connect { cause, .. } => *cause,
        other => panic!("expected Error::Connect, got {other:?}"),
    }
}

#[test]
fn the_right_credentials_and_ca_publish_and_consume_end_to_end_over_tls() {
    let Some(tools) = tools() else { return };
    let s = secured(&tools);
    let password_file = s.secrets.secret("nats-password", &format!("{PASSWORD}\n"));
    let seed_file = s.secrets.secret("relay.nk", &format!("{}\n", s.nkey_seed));

    // The publisher: user + password from a file, over a tls:// URL.
    let publisher_options = s.tls().user_and_password_file(USER, &password_file);
    let mut publisher = NatsPublisher::connect(
        &s.server.url("tls"),
        PublisherConfig::default().connect_options(publisher_options),
    )
    .unwrap_or_else(|e| panic!("{}\n{}", error_chain(&e), s.server.log()));
    let stream = unique("SECURE");
    let topic = unique("secure.orders");
    publisher
        .ensure_stream(&stream, &[&topic])
        .expect("the stream");
    let sent = message(&topic, "order:1", 0);
    let results = publisher.publish(std::slice::from_ref(&sent));
    assert!(results.iter().all(Result::is_ok), "{results:?}");

    // The consumer: an nkey seed file, a nats:// URL with TLS required by the client.
    let consumer_options = s.tls().nkey_seed_file(&seed_file).require_tls(true);
    let mut consumer = NatsConsumer::connect(
        &s.server.url("nats"),
        ConsumerConfig::new(&stream, "billing").connect_options(consumer_options),
    )
    .unwrap_or_else(|e| panic!("{}\n{}", error_chain(&e), s.server.log()));
    let mut seen = Vec::new();
    let mut handler = |msg: &IncomingMessage| {
        seen.push((msg.id, msg.payload.clone()));
        Disposition::Ack
    };
    let total = consume_until(&mut consumer, &mut handler, |t| t.acked >= 1);
    assert_eq!(total.acked, 1);
    assert_eq!(seen, vec![(sent.id, sent.payload.clone())]);
}

#[test]
fn a_wrong_password_is_refused_as_an_authorization_violation() {
    let Some(tools) = tools() else { return };
    let s = secured(&tools);
    let wrong = s.secrets.secret("wrong-password", "not-the-password");
    let options = s.tls().user_and_password_file(USER, &wrong);
    let error = NatsPublisher::connect(
        &s.server.url("tls"),
        PublisherConfig::default().connect_options(options),
    )
    .expect_err("a wrong password");
    let shown = checked(&error);
    assert_eq!(cause(&error), ConnectFailure::Credentials, "{shown}");
    assert!(shown.contains("refused the credentials"), "{shown}");
    assert!(shown.contains("authorization violation"), "{shown}");
    assert!(!shown.contains("not-the-password"), "{shown}");
    assert!(!error.is_retryable(), "{shown}");

    // The nkey of another user is refused the same way, for the consumer too.
    let (other_seed, _) = user_nkey();
    let seed_file = s.secrets.secret("other.nk", &other_seed);
    let options = s.tls().nkey_seed_file(&seed_file);
    let error = NatsConsumer::connect(
        &s.server.url("tls"),
        ConsumerConfig::new("ANY", "c").connect_options(options),
    )
    .expect_err("an unknown nkey");
    let shown = checked(&error);
    assert_eq!(cause(&error), ConnectFailure::Credentials, "{shown}");
    assert!(!shown.contains(&other_seed), "{shown}");
}

#[test]
fn a_server_certificate_from_another_ca_is_refused_as_a_tls_error() {
    let Some(tools) = tools() else { return };
    let s = secured(&tools);
    let options = ConnectOptions::default()
        .root_certificates(&s.pki.wrong_ca)
        .client_certificate(&s.pki.client_cert, &s.pki.client_key)
        .user_and_password(USER, PASSWORD);
    let error = NatsPublisher::connect(
        &s.server.url("tls"),
        PublisherConfig::default().connect_options(options),
    )
    .expect_err("a certificate no trusted CA signed");
    let shown = checked(&error);
    assert_eq!(cause(&error), ConnectFailure::Tls, "{shown}");
    assert!(shown.contains("TLS failed"), "{shown}");
    assert!(shown.contains("UnknownIssuer"), "{shown}");
    assert!(!error.is_retryable(), "{shown}");
}

#[test]
fn a_nats_url_to_a_tls_server_is_upgraded_never_used_in_plain_text() {
    let Some(tools) = tools() else { return };
    let s = secured(&tools);
    // Plain TCP, as a client that does not speak TLS would talk: the server announces that it
    // requires TLS and closes the connection without ever answering the PING.
    let answer = plain_text_connect(s.server.port);
    assert!(!answer.contains("PONG"), "{answer}");

    // A nats:// URL without the test CA: the client upgrades to TLS (before sending the
    // password) and refuses the certificate, instead of falling back to plain text.
    let options = ConnectOptions::default()
        .client_certificate(&s.pki.client_cert, &s.pki.client_key)
        .user_and_password(USER, PASSWORD);
    let error = NatsPublisher::connect(
        &s.server.url("nats"),
        PublisherConfig::default().connect_options(options),
    )
    .expect_err("an untrusted certificate");
    let shown = checked(&error);
    assert_eq!(cause(&error), ConnectFailure::Tls, "{shown}");

    // With the CA, the same nats:// URL connects, over TLS.
    let options = s.tls().user_and_password(USER, PASSWORD);
    NatsPublisher::connect(
        &s.server.url("nats"),
        PublisherConfig::default().connect_options(options),
    )
    .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
}

/// Talks the NATS protocol in plain text: reads INFO (which must require TLS), sends CONNECT
/// and PING, and returns everything the server answers until it closes the connection.
fn plain_text_connect(port: u16) -> String {
    use std::io::{BufRead, BufReader, Write};
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("a TCP connection");
    stream
        .set_read_timeout(Some(common::DEADLINE))
        .expect("a read timeout");
    let mut reader = BufReader::new(stream.try_clone().expect("a second handle"));
    let mut info = String::new();
    reader.read_line(&mut info).expect("INFO");
    assert!(info.contains("\"tls_required\":true"), "{info}");
    let mut writer = stream;
    // Errors are expected here: the server may close the connection at once.
    let _ = writer.write_all(b"CONNECT {\"verbose\":false}\r\nPING\r\n");
    let mut answer = Vec::new();
    let _ = std::io::Read::read_to_end(&mut reader, &mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn a_missing_client_certificate_is_refused_by_a_server_that_verifies_clients() {
    let Some(tools) = tools() else { return };
    let s = secured(&tools);
    let options = ConnectOptions::default()
        .root_certificates(&s.pki.ca)
        .user_and_password(USER, PASSWORD);
    let error = NatsPublisher::connect(
        &s.server.url("tls"),
        PublisherConfig::default().connect_options(options),
    )
    .expect_err("no client certificate");
    let shown = checked(&error);
    assert_eq!(cause(&error), ConnectFailure::Tls, "{shown}");
    assert!(shown.contains("Certificate"), "{shown}");
}

#[test]
fn require_tls_refuses_a_server_without_tls() {
    let Some(tools) = tools() else { return };
    let pki = Pki::new(&tools.openssl);
    let server = PrivateServer::start(&tools, "");
    // Without require_tls the plain server is fine...
    NatsPublisher::connect(&server.url("nats"), PublisherConfig::default())
        .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    // ...with it, the client refuses to talk to it in plain text.
    let options = ConnectOptions::default()
        .root_certificates(&pki.ca)
        .user_and_password(USER, PASSWORD)
        .require_tls(true);
    let error = NatsPublisher::connect(
        &server.url("nats"),
        PublisherConfig::default().connect_options(options),
    )
    .expect_err("a server without TLS");
    let shown = checked(&error);
    assert_eq!(cause(&error), ConnectFailure::Tls, "{shown}");
}

#[test]
fn a_token_file_authenticates_and_a_wrong_token_is_refused() {
    let Some(tools) = tools() else { return };
    let pki = Pki::new(&tools.openssl);
    let server = PrivateServer::start(
        &tools,
        &format!(
            "{}authorization {{\n  token: {TOKEN:?}\n}}\n",
            pki.tls_block(false)
        ),
    );
    let secrets = TempDir::new("waybill-nats-secrets");
    let token_file = secrets.secret("token", &format!("{TOKEN}\n"));
    let tls = ConnectOptions::default().root_certificates(&pki.ca);
    let publisher = NatsPublisher::connect(
        &server.url("tls"),
        PublisherConfig::default().connect_options(tls.clone().token_file(&token_file)),
    )
    .unwrap_or_else(|e| panic!("{}\n{}", error_chain(&e), server.log()));
    let stream = unique("TOKEN");
    publisher
        .ensure_stream(&stream, &[&unique("token.orders")])
        .expect("JetStream behind the token");

    let error = NatsPublisher::connect(
        &server.url("tls"),
        PublisherConfig::default().connect_options(tls.token("tok-wrong-never-shown")),
    )
    .expect_err("a wrong token");
    let shown = checked(&error);
    assert!(!shown.contains("tok-wrong-never-shown"), "{shown}");
    assert_eq!(cause(&error), ConnectFailure::Credentials, "{shown}");
}

#[test]
fn credentials_in_the_url_authenticate_and_a_wrong_one_is_refused() {
    let Some(tools) = tools() else { return };
    let s = secured(&tools);
    let url = |password: &str| format!("tls://{USER}:{password}@127.0.0.1:{}", s.server.port);
    let publisher = NatsPublisher::connect(
        &url(PASSWORD),
        PublisherConfig::default().connect_options(s.tls()),
    )
    .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    assert!(!format!("{publisher:?}").contains(PASSWORD));

    let error = NatsPublisher::connect(
        &url("wrong-url-password"),
        PublisherConfig::default().connect_options(s.tls()),
    )
    .expect_err("a wrong password in the URL");
    let shown = checked(&error);
    assert_eq!(cause(&error), ConnectFailure::Credentials, "{shown}");
    assert!(!shown.contains("wrong-url-password"), "{shown}");
}

#[test]
fn a_credentials_file_authenticates_and_one_of_an_unknown_account_is_refused() {
    let Some(tools) = tools() else { return };
    let pki = Pki::new(&tools.openssl);
    let operator = Operator::new();
    let server = PrivateServer::start(
        &tools,
        &format!("{}{}", pki.tls_block(false), operator.server_config),
    );
    let secrets = TempDir::new("waybill-nats-secrets");
    let creds = secrets.secret("relay.creds", &operator.creds);
    let tls = ConnectOptions::default().root_certificates(&pki.ca);
    let publisher = NatsPublisher::connect(
        &server.url("tls"),
        PublisherConfig::default().connect_options(tls.clone().credentials_file(&creds)),
    )
    .unwrap_or_else(|e| panic!("{}\n{}", error_chain(&e), server.log()));
    publisher
        .ensure_stream(&unique("CREDS"), &[&unique("creds.orders")])
        .unwrap_or_else(|e| panic!("{}\n{}", error_chain(&e), server.log()));

    // A user of another operator's account: well formed, but the server does not know it.
    let stranger = secrets.secret("stranger.creds", &Operator::new().creds);
    let error = NatsPublisher::connect(
        &server.url("tls"),
        PublisherConfig::default().connect_options(tls.credentials_file(&stranger)),
    )
    .expect_err("an unknown account");
    let shown = checked(&error);
    assert_eq!(cause(&error), ConnectFailure::Credentials, "{shown}");
    assert!(!shown.contains("NKEY SEED"), "{shown}");
}
