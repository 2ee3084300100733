//! The broker connection flags of the `waybill` binary, shared with the audit and the order
//! service so that every binary secures its broker connections the same way: a password from a
//! file, NATS credentials and TLS, RabbitMQ TLS, and librdkafka properties. Flatten
//! [`BrokerArgs`] into a clap parser and build the transports' options from it.
//!
//! ```
//! use clap::Parser;
//! use waybill_cli::connect::BrokerArgs;
//!
//! #[derive(Parser)]
//! struct Args {
//!     #[arg(long)]
//!     broker_url: String,
//!     #[command(flatten)]
//!     broker: BrokerArgs,
//! }
//!
//! let args = Args::parse_from(["relay", "--broker-url", "kafka://relay@k1:9093",
//!     "--kafka-option", "security.protocol=SASL_SSL"]);
//! assert_eq!(args.broker.url(&args.broker_url)?, "kafka://relay@k1:9093");
//! # Ok::<(), waybill_cli::connect::ConnectError>(())
//! ```

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{ArgGroup, Args as ClapArgs};
use waybill_outbox_core::redact_url as redact;

/// What is wrong with the connection flags.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// Flags that do not fit together or with the broker URL.
    #[error("{0}")]
    Usage(String),
    /// `--broker-password-file` could not be read.
    #[error("reading the broker password file {path} failed")]
    PasswordFile {
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Every broker connection flag: flatten it into a binary's clap parser.
#[derive(Clone, Debug, Default, PartialEq, Eq, ClapArgs)]
pub struct BrokerArgs {
    /// The file holding the broker password, filled into the broker URL's user info
    /// (amqp://USER@HOST/..., nats://USER@HOST, tls://USER@HOST, or kafka://USER@HOST:PORT for
    /// Kafka's `sasl.username` / `sasl.password`); never logged. A file that others may read
    /// (mode wider than 0600) is used with a warning.
    #[arg(long, env = "BROKER_PASSWORD_FILE")]
    pub broker_password_file: Option<PathBuf>,
    /// NATS options: credentials, TLS.
    #[command(flatten)]
    pub nats: NatsArgs,
    /// RabbitMQ options: TLS.
    #[command(flatten)]
    pub amqp: AmqpArgs,
    /// Kafka options: librdkafka properties (security).
    #[command(flatten)]
    pub kafka: KafkaArgs,
}

impl BrokerArgs {
    /// `url` with the password of `--broker-password-file` filled into its user info, after
    /// checking that the other flags fit its scheme.
    ///
    /// # Errors
    ///
    /// [`ConnectError::Usage`] when flags of another broker are set, or the password file is
    /// given and no URL of the list has a user (or one has a password already);
    /// [`ConnectError::PasswordFile`] when the file cannot be read.
    pub fn url(&self, url: &str) -> Result<String, ConnectError> {
        let usage = |flags: &str, schemes: &str| {
            ConnectError::Usage(format!(
                "{flags} options need {schemes} broker URL, not {}",
                redact(url)
            ))
        };
        let is_nats = url.starts_with("nats://") || url.starts_with("tls://");
        if self.nats.any() && !is_nats {
            return Err(usage("--nats-*", "a nats:// or tls://"));
        }
        if self.amqp.any() && !url.starts_with("amqps://") {
            return Err(usage("--amqp-*", "an amqps://"));
        }
        if !self.kafka.kafka_options.is_empty() && !url.starts_with("kafka://") {
            return Err(usage("--kafka-option", "a kafka://"));
        }
        let Some(path) = &self.broker_password_file else {
            return Ok(url.to_owned());
        };
        let password = waybill_outbox_core::read_secret_file(path).map_err(|source| {
            ConnectError::PasswordFile {
                path: path.clone(),
                source,
            }
        })?;
        with_password(url, &password).ok_or_else(|| {
            ConnectError::Usage(format!(
                "--broker-password-file needs a user and no password in the broker URL \
                 (SCHEME://USER@HOST...), not {}",
                redact(url)
            ))
        })
    }

    /// These flags as a command line again, for a child process that connects the same way
    /// (the audit's workers). The password file is left out when `with_password_file` is
    /// false (the child is given a URL with the password in it).
    pub fn to_args(&self, with_password_file: bool) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut path = |flag: &str, value: &Option<PathBuf>| {
            if let Some(value) = value {
                args.extend([OsString::from(flag), value.into()]);
            }
        };
        if with_password_file {
            path("--broker-password-file", &self.broker_password_file);
        }
        let (nats, amqp) = (&self.nats, &self.amqp);
        path("--nats-creds", &nats.nats_creds);
        path("--nats-nkey-file", &nats.nats_nkey_file);
        path("--nats-token-file", &nats.nats_token_file);
        path("--nats-ca", &nats.nats_ca);
        path("--nats-client-cert", &nats.nats_client_cert);
        path("--nats-client-key", &nats.nats_client_key);
        path("--amqp-ca", &amqp.amqp_ca);
        path("--amqp-client-cert", &amqp.amqp_client_cert);
        path("--amqp-client-key", &amqp.amqp_client_key);
        if nats.nats_require_tls {
            args.push("--nats-require-tls".into());
        }
        for (name, value) in &self.kafka.kafka_options {
            args.extend(["--kafka-option".into(), format!("{name}={value}").into()]);
        }
        args
    }

    /// The NATS connect options the `--nats-*` flags ask for.
    #[cfg(feature = "nats")]
    pub fn nats_options(&self) -> waybill_nats::ConnectOptions {
        let args = &self.nats;
        let mut options =
            waybill_nats::ConnectOptions::default().require_tls(args.nats_require_tls);
        if let Some(path) = &args.nats_creds {
            options = options.credentials_file(path);
        }
        if let Some(path) = &args.nats_nkey_file {
            options = options.nkey_seed_file(path);
        }
        if let Some(path) = &args.nats_token_file {
            options = options.token_file(path);
        }
        if let Some(path) = &args.nats_ca {
            options = options.root_certificates(path);
        }
        if let (Some(cert), Some(key)) = (&args.nats_client_cert, &args.nats_client_key) {
            options = options.client_certificate(cert, key);
        }
        options
    }

    /// The TLS options the `--amqp-*` flags ask for.
    #[cfg(feature = "amqp")]
    pub fn amqp_tls(&self) -> waybill_amqp::TlsOptions {
        let args = &self.amqp;
        let mut tls = waybill_amqp::TlsOptions::default();
        if let Some(path) = &args.amqp_ca {
            tls = tls.root_certificates(path);
        }
        if let (Some(cert), Some(key)) = (&args.amqp_client_cert, &args.amqp_client_key) {
            tls = tls.client_certificate(cert, key);
        }
        tls
    }

    /// A Kafka publisher configuration with the `--kafka-option` properties.
    #[cfg(feature = "kafka")]
    pub fn kafka_publisher(&self) -> waybill_kafka::PublisherConfig {
        let options = self.kafka.kafka_options.iter();
        options.fold(
            waybill_kafka::PublisherConfig::default(),
            |config, (k, v)| config.set(k, v),
        )
    }

    /// `config` with the `--kafka-option` properties.
    #[cfg(feature = "kafka")]
    pub fn kafka_consumer(
        &self,
        config: waybill_kafka::ConsumerConfig,
    ) -> waybill_kafka::ConsumerConfig {
        let options = self.kafka.kafka_options.iter();
        options.fold(config, |config, (k, v)| config.set(k, v))
    }
}

/// How a binary authenticates to NATS and secures the connection (the NATS broker URL
/// only). Secret files that others may read (mode wider than 0600) are used with a warning.
#[derive(Clone, Debug, Default, PartialEq, Eq, ClapArgs)]
#[command(group(ArgGroup::new("nats_auth").multiple(false).args(["nats_creds", "nats_nkey_file", "nats_token_file"])))]
pub struct NatsArgs {
    /// NATS: authenticate with this credentials file (.creds, as nsc writes it).
    #[arg(long, env = "NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// NATS: authenticate with the user nkey whose seed (SU...) is in this file.
    #[arg(long, env = "NATS_NKEY_FILE")]
    pub nats_nkey_file: Option<PathBuf>,
    /// NATS: authenticate with the token in this file.
    #[arg(long, env = "NATS_TOKEN_FILE")]
    pub nats_token_file: Option<PathBuf>,
    /// NATS: trust the CA certificates in this PEM file (a private CA), besides the system's.
    #[arg(long, env = "NATS_CA")]
    pub nats_ca: Option<PathBuf>,
    /// NATS: present this client certificate (PEM), with --nats-client-key.
    #[arg(long, env = "NATS_CLIENT_CERT", requires = "nats_client_key")]
    pub nats_client_cert: Option<PathBuf>,
    /// NATS: the client certificate's private key (PEM).
    #[arg(long, env = "NATS_CLIENT_KEY", requires = "nats_client_cert")]
    pub nats_client_key: Option<PathBuf>,
    /// NATS: connect over TLS only, even to a nats:// URL (a server without TLS is refused).
    #[arg(long, env = "NATS_REQUIRE_TLS")]
    pub nats_require_tls: bool,
}

impl NatsArgs {
    /// Whether any option is set (they need a NATS broker URL).
    pub fn any(&self) -> bool {
        self.nats_creds.is_some()
            || self.nats_nkey_file.is_some()
            || self.nats_token_file.is_some()
            || self.nats_ca.is_some()
            || self.nats_client_cert.is_some()
            || self.nats_require_tls
    }
}

/// How a binary secures an `amqps://` connection to RabbitMQ. The server name is always
/// checked against its certificate; for the EXTERNAL mechanism (the client certificate as the
/// login), add `?auth_mechanism=external` to the URL.
#[derive(Clone, Debug, Default, PartialEq, Eq, ClapArgs)]
pub struct AmqpArgs {
    /// RabbitMQ: trust the CA certificates in this PEM file (a private CA) instead of the system's.
    #[arg(long, env = "AMQP_CA")]
    pub amqp_ca: Option<PathBuf>,
    /// RabbitMQ: present this client certificate (PEM), with --amqp-client-key.
    #[arg(long, env = "AMQP_CLIENT_CERT", requires = "amqp_client_key")]
    pub amqp_client_cert: Option<PathBuf>,
    /// RabbitMQ: the client certificate's private key (PEM).
    #[arg(long, env = "AMQP_CLIENT_KEY", requires = "amqp_client_cert")]
    pub amqp_client_key: Option<PathBuf>,
}

impl AmqpArgs {
    /// Whether any option is set (they need an amqps:// broker URL).
    pub fn any(&self) -> bool {
        self.amqp_ca.is_some() || self.amqp_client_cert.is_some()
    }
}

/// How a binary connects to a Kafka cluster that demands security: librdkafka's own
/// properties, so its documentation applies. The SASL user and password come from the broker
/// URL's user info and `--broker-password-file`, never from a property on the command line.
#[derive(Clone, Debug, Default, PartialEq, Eq, ClapArgs)]
pub struct KafkaArgs {
    /// Kafka: a librdkafka property as NAME=VALUE, repeatable, for every Kafka client made
    /// (producer, consumer, the admin client that creates topics); e.g. `security.protocol=SASL_SSL`,
    /// `sasl.mechanism=SCRAM-SHA-512`, `ssl.ca.location=/etc/waybill/kafka-ca.pem`.
    #[arg(long = "kafka-option", value_name = "NAME=VALUE", value_parser = parse_kafka_option)]
    pub kafka_options: Vec<(String, String)>,
}

/// A librdkafka property, or a usage error; secrets are refused (they would show in `ps`).
fn parse_kafka_option(text: &str) -> Result<(String, String), String> {
    let (name, value) = text
        .split_once('=')
        .filter(|(name, _)| !name.trim().is_empty())
        .ok_or_else(|| "expected NAME=VALUE, e.g. security.protocol=SASL_SSL".to_owned())?;
    let name = name.trim();
    if name.contains("password") || name.contains("secret") {
        return Err(format!(
            "{name} would show in the process list: put the password in a file and pass \
             --broker-password-file, with the user in the URL (kafka://USER@HOST:PORT)"
        ));
    }
    Ok((name.to_owned(), value.to_owned()))
}

/// `url` (each of a comma-separated list) with `password` percent-encoded after the user of
/// its user info; `None` when no URL has a user, or one already has a password.
fn with_password(url: &str, password: &str) -> Option<String> {
    let encoded: String = password
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    let mut filled = false;
    let urls = url
        .split(',')
        .map(|one| {
            let Some((scheme, rest)) = one.split_once("://") else {
                return Some(one.to_owned()); // another server of the list
            };
            let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            let Some(at) = rest[..authority_end].rfind('@') else {
                return Some(one.to_owned());
            };
            let (user, host) = (&rest[..at], &rest[at..]);
            if user.contains(':') || user.is_empty() {
                return None;
            }
            filled = true;
            Some(format!("{scheme}://{user}:{encoded}{host}"))
        })
        .collect::<Option<Vec<_>>>()?;
    filled.then(|| urls.join(","))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{with_password, BrokerArgs};

    #[derive(Parser)]
    struct Binary {
        #[command(flatten)]
        broker: BrokerArgs,
    }

    #[test]
    fn flags_rendered_as_a_command_line_parse_back_the_same() {
        let given = [
            "binary",
            "--broker-password-file",
            "/run/pw",
            "--nats-nkey-file",
            "/run/seed",
            "--nats-ca",
            "/etc/ca.pem",
            "--nats-client-cert",
            "/etc/c.pem",
            "--nats-client-key",
            "/etc/k.pem",
            "--nats-require-tls",
            "--amqp-ca",
            "/etc/mq.pem",
            "--kafka-option",
            "security.protocol=SASL_SSL",
            "--kafka-option",
            "client.id=a=b",
        ];
        let parsed = Binary::try_parse_from(given).unwrap().broker;
        assert_eq!(
            parsed.kafka.kafka_options[1],
            ("client.id".into(), "a=b".into())
        );
        let again = |with_password_file| {
            let args = std::iter::once("binary".into()).chain(parsed.to_args(with_password_file));
            Binary::try_parse_from(args).unwrap().broker
        };
        assert_eq!(again(true), parsed);
        let without = again(false);
        assert_eq!(without.broker_password_file, None);
        assert_eq!(
            BrokerArgs {
                broker_password_file: None,
                ..parsed
            },
            without
        );
    }

    #[test]
    fn a_secret_as_a_kafka_option_is_refused() {
        let refused = Binary::try_parse_from(["b", "--kafka-option", "sasl.password=x"]);
        let error = refused.err().unwrap().to_string();
        assert!(error.contains("--broker-password-file"), "{error}");
    }

    #[test]
    fn the_password_is_filled_in_percent_encoded_after_the_user() {
        assert_eq!(
            with_password("amqps://relay@mq:5671/%2f", "p@ss:w/rd").as_deref(),
            Some("amqps://relay:p%40ss%3Aw%2Frd@mq:5671/%2f")
        );
        assert_eq!(
            with_password("nats://relay@h1:4222,nats://relay@h2:4222", "pw").as_deref(),
            Some("nats://relay:pw@h1:4222,nats://relay:pw@h2:4222")
        );
        assert_eq!(
            with_password("kafka://relay@h1:9092,h2:9092", "pw").as_deref(),
            Some("kafka://relay:pw@h1:9092,h2:9092")
        );
        assert_eq!(with_password("nats://h1:4222", "pw"), None); // no user
        assert_eq!(with_password("amqp://u:old@h/%2f", "pw"), None); // a password already
        assert_eq!(with_password("amqp://h/v@x", "pw"), None); // `@` after the authority
    }
}
