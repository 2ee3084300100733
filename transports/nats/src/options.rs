//! [`ConnectOptions`]: how a publisher or consumer authenticates and secures its connection.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// How a [`NatsPublisher`](crate::NatsPublisher) or [`NatsConsumer`](crate::NatsConsumer)
/// authenticates to the server and secures the connection: one authentication (a credentials
/// file, an nkey seed file, a token, or a user and password), and TLS with a private CA, a
/// client certificate, or TLS required whatever the server offers.
///
/// Set it with [`PublisherConfig::connect_options`](crate::PublisherConfig::connect_options)
/// and [`ConsumerConfig::connect_options`](crate::ConsumerConfig::connect_options). Secrets
/// kept in files are read when connecting, each with a warning when its mode lets the group or
/// others read it (wider than `0600`). `Debug` shows which authentication is configured and
/// the paths, never a token, password or seed; neither do errors nor logs.
///
/// An authentication set here takes precedence over credentials in the URL
/// (`nats://user:password@host`, `nats://token@host`), which are used otherwise.
///
/// TLS: a `tls://` URL, [`require_tls`](Self::require_tls), or a server that requires TLS
/// (`tls_required` in its INFO) makes the client upgrade the connection before it sends any
/// credential; a `nats://` URL to such a server is upgraded too, never used in plain text. The
/// server's certificate is verified against the system's roots plus the certificates added
/// with [`root_certificates`](Self::root_certificates), and its name against the URL's host.
///
/// ```
/// use waybill_nats::{ConnectOptions, PublisherConfig};
///
/// let options = ConnectOptions::default()
///     .user_and_password_file("relay", "/run/secrets/nats-password")
///     .root_certificates("/etc/waybill/nats-ca.pem")
///     .client_certificate("/etc/waybill/relay.pem", "/etc/waybill/relay-key.pem")
///     .require_tls(true);
/// let config = PublisherConfig::default().connect_options(options);
/// # let _ = config;
///
/// let token = ConnectOptions::default().token("s3cret-token");
/// assert_eq!(format!("{token:?}"), "ConnectOptions { auth: Token(***), root_certificates: [], \
///     client_certificate: None, require_tls: false }");
/// ```
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct ConnectOptions {
    auth: Auth,
    root_certificates: Vec<PathBuf>,
    client_certificate: Option<(PathBuf, PathBuf)>,
    require_tls: bool,
}

/// The one authentication in effect; a later setter replaces an earlier one.
#[derive(Clone, Default)]
enum Auth {
    /// Only what the URL carries (`nats://user:password@host`, `nats://token@host`), which
    /// async-nats itself ignores: [`url_userinfo`](waybill_outbox_core::url_userinfo) reads it.
    #[default]
    Url,
    CredentialsFile(PathBuf),
    NkeySeedFile(PathBuf),
    Token(String),
    TokenFile(PathBuf),
    UserPassword {
        user: String,
        password: String,
    },
    UserPasswordFile {
        user: String,
        password_file: PathBuf,
    },
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Url => f.write_str("Url"),
            Self::CredentialsFile(path) => f.debug_tuple("CredentialsFile").field(path).finish(),
            Self::NkeySeedFile(path) => f.debug_tuple("NkeySeedFile").field(path).finish(),
            Self::Token(_) => f.write_str("Token(***)"),
            Self::TokenFile(path) => f.debug_tuple("TokenFile").field(path).finish(),
            Self::UserPassword { user, .. } => f
                .debug_struct("UserPassword")
                .field("user", user)
                .field("password", &format_args!("***"))
                .finish(),
            Self::UserPasswordFile {
                user,
                password_file,
            } => f
                .debug_struct("UserPasswordFile")
                .field("user", user)
                .field("password_file", password_file)
                .finish(),
        }
    }
}

impl fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("auth", &self.auth)
            .field("root_certificates", &self.root_certificates)
            .field("client_certificate", &self.client_certificate)
            .field("require_tls", &self.require_tls)
            .finish()
    }
}

impl ConnectOptions {
    /// Authenticates with a NATS credentials file (`.creds`: a user JWT and its nkey seed, as
    /// `nsc` and Synadia Cloud issue them). Replaces any other authentication. Defaults to
    /// none: only what the URL carries.
    #[must_use]
    pub fn credentials_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.auth = Auth::CredentialsFile(path.into());
        self
    }

    /// Authenticates with the user nkey whose seed (`SU...`) is in the file at `path`: the
    /// client signs the server's nonce, the seed never leaves the process. Replaces any other
    /// authentication. Defaults to none.
    #[must_use]
    pub fn nkey_seed_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.auth = Auth::NkeySeedFile(path.into());
        self
    }

    /// Authenticates with a token. Prefer [`token_file`](Self::token_file) so the token is not
    /// in the command line or environment. Replaces any other authentication. Defaults to none.
    #[must_use]
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.auth = Auth::Token(token.into());
        self
    }

    /// Authenticates with the token in the file at `path` (one trailing line break ignored).
    /// Replaces any other authentication. Defaults to none.
    #[must_use]
    pub fn token_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.auth = Auth::TokenFile(path.into());
        self
    }

    /// Authenticates as `user` with `password`. Replaces any other authentication. Defaults
    /// to none.
    #[must_use]
    pub fn user_and_password(
        mut self,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.auth = Auth::UserPassword {
            user: user.into(),
            password: password.into(),
        };
        self
    }

    /// Authenticates as `user` with the password in the file at `password_file` (one trailing
    /// line break ignored). Replaces any other authentication. Defaults to none.
    #[must_use]
    pub fn user_and_password_file(
        mut self,
        user: impl Into<String>,
        password_file: impl Into<PathBuf>,
    ) -> Self {
        self.auth = Auth::UserPasswordFile {
            user: user.into(),
            password_file: password_file.into(),
        };
        self
    }

    /// Trusts the CA certificates in the PEM file at `path` (a private CA), besides the
    /// system's roots. Adds to those already set. Defaults to the system's roots only.
    #[must_use]
    pub fn root_certificates(mut self, path: impl Into<PathBuf>) -> Self {
        self.root_certificates.push(path.into());
        self
    }

    /// Presents the client certificate in the PEM file `cert` with its private key in `key`,
    /// for servers that verify clients (`verify: true` in the server's `tls` block). Defaults
    /// to none.
    #[must_use]
    pub fn client_certificate(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client_certificate = Some((cert.into(), key.into()));
        self
    }

    /// With `true`, connects only over TLS, even when the URL says `nats://` and the server
    /// does not require it: a server without TLS is refused instead of used in plain text.
    /// Defaults to `false` (TLS when the URL says `tls://` or the server requires it).
    #[must_use]
    pub fn require_tls(mut self, required: bool) -> Self {
        self.require_tls = required;
        self
    }

    /// The async-nats options these stand for, for the server(s) at `url`, secret files read
    /// now.
    pub(crate) async fn client_options(&self, url: &str) -> Result<async_nats::ConnectOptions> {
        let mut options = async_nats::ConnectOptions::new();
        options = match &self.auth {
            // async-nats (0.51) ignores the URL's user info: without this,
            // `nats://user:password@host` would connect without authenticating.
            Auth::Url => match waybill_outbox_core::url_userinfo(url) {
                None => options,
                Some((token, None)) => options.token(token),
                Some((user, Some(password))) => options.user_and_password(user, password),
            },
            Auth::CredentialsFile(path) => {
                // Whole, its last line break included: async-nats's parser needs it.
                waybill_outbox_core::warn_if_shared(path);
                let creds = std::fs::read_to_string(path).map_err(|source| Error::ReadFile {
                    what: "credentials file",
                    path: path.clone(),
                    source,
                })?;
                options
                    .credentials(&creds)
                    .map_err(|source| Error::InvalidSecretFile {
                        what: "credentials file",
                        path: path.clone(),
                        // The parser's own message says little; name what the file must hold.
                        reason: format!(
                            "it does not hold a user JWT and an nkey seed as nsc writes them ({})",
                            source.kind()
                        ),
                    })?
            }
            Auth::NkeySeedFile(path) => {
                let seed = read_secret("nkey seed file", path)?;
                let seed = seed.trim();
                if !seed.starts_with("SU") {
                    return Err(Error::InvalidSecretFile {
                        what: "nkey seed file",
                        path: path.clone(),
                        reason: "it does not hold a user nkey seed (SU...)".into(),
                    });
                }
                options.nkey(seed.to_owned())
            }
            Auth::Token(token) => options.token(token.clone()),
            Auth::TokenFile(path) => options.token(read_secret("token file", path)?),
            Auth::UserPassword { user, password } => {
                options.user_and_password(user.clone(), password.clone())
            }
            Auth::UserPasswordFile {
                user,
                password_file,
            } => options
                .user_and_password(user.clone(), read_secret("password file", password_file)?),
        };
        for path in &self.root_certificates {
            readable("CA certificate file", path)?;
            options = options.add_root_certificates(path.clone());
        }
        if let Some((cert, key)) = &self.client_certificate {
            readable("client certificate file", cert)?;
            readable("client key file", key)?;
            waybill_outbox_core::warn_if_shared(key);
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        Ok(options.require_tls(self.require_tls))
    }
}

fn read_secret(what: &'static str, path: &Path) -> Result<String> {
    waybill_outbox_core::read_secret_file(path).map_err(|source| Error::ReadFile {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Checks that a file the client reads by path itself can be opened, so a wrong path is an
/// error naming the option instead of the client's bare TLS error.
fn readable(what: &'static str, path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|source| Error::ReadFile {
            what,
            path: path.to_owned(),
            source,
        })
}
