//! Picks the backend from the database URL and runs the command on it.

use diesel::r2d2::{CustomizeConnection, R2D2Connection};
use diesel::Connection;
use waybill_diesel::{InOrderConnection, OpsConnection};

use crate::cli::{Args, Command, Operation};
use crate::error::CliError;
use waybill_outbox_core::redact_url as redact;

/// A database the binary can work on.
pub(crate) trait Backend:
    OpsConnection + InOrderConnection + R2D2Connection + Connection + Send + 'static
{
    /// Settings every new connection gets.
    fn prepare(_conn: &mut Self) -> waybill_diesel::Result<()> {
        Ok(())
    }
}

#[cfg(feature = "postgres")]
impl Backend for diesel::PgConnection {}

#[cfg(feature = "mysql")]
impl Backend for diesel::MysqlConnection {}

#[cfg(feature = "sqlite")]
impl Backend for diesel::SqliteConnection {
    fn prepare(conn: &mut Self) -> waybill_diesel::Result<()> {
        waybill_diesel::sqlite::SqliteOptions::default().apply(conn)
    }
}

/// Applies [`Backend::prepare`] to pooled connections.
#[derive(Debug)]
pub(crate) struct Prepare;

impl<C: Backend> CustomizeConnection<C, diesel::r2d2::Error> for Prepare {
    fn on_acquire(&self, conn: &mut C) -> Result<(), diesel::r2d2::Error> {
        C::prepare(conn).map_err(|error| match error {
            waybill_diesel::Error::Database(e) => diesel::r2d2::Error::QueryError(e),
            other => diesel::r2d2::Error::QueryError(diesel::result::Error::QueryBuilderError(
                other.to_string().into(),
            )),
        })
    }
}

/// The database a URL names.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    Postgres(String),
    Mysql(String),
    Sqlite(String),
}

/// What `--database-url` accepts, for error messages.
pub(crate) const ACCEPTED_URLS: &str =
    "postgres://..., postgresql://..., mysql://..., mariadb://..., sqlite://PATH or a SQLite file path";

/// Picks the backend from the URL's scheme; an unknown scheme or an empty URL is refused rather
/// than taken for a SQLite file name.
fn target(url: &str) -> Result<Target, CliError> {
    if url.trim().is_empty() {
        return Err(CliError::EmptyDatabaseUrl);
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return Ok(Target::Sqlite(url.to_owned()));
    };
    match scheme.to_ascii_lowercase().as_str() {
        "postgres" | "postgresql" => Ok(Target::Postgres(url.to_owned())),
        "mysql" => Ok(Target::Mysql(url.to_owned())),
        "mariadb" => Ok(Target::Mysql(format!("mysql://{rest}"))),
        "sqlite" if !rest.is_empty() => Ok(Target::Sqlite(rest.to_owned())),
        _ => Err(CliError::UnknownScheme {
            url: redact(url),
            scheme: scheme.to_owned(),
        }),
    }
}

/// Runs `args.command` on the database `args.database_url` names.
pub(crate) fn run(args: Args) -> Result<(), CliError> {
    let url = args.database_url.clone().ok_or(CliError::NoDatabase)?;
    if let Command::Operation(Operation::Partitions { command }) = args.command {
        return match target(&url)? {
            #[cfg(feature = "postgres")]
            Target::Postgres(url) => crate::partitions::run(
                &mut connect::<diesel::PgConnection>(&url)?,
                command,
                args.json,
            ),
            _ => Err(CliError::PartitionsNeedPostgres(redact(&url))),
        };
    }
    match target(&url)? {
        Target::Postgres(url) => {
            #[cfg(feature = "postgres")]
            return run_on::<diesel::PgConnection>(&url, args);
            #[cfg(not(feature = "postgres"))]
            return Err(not_built(&url, "postgres"));
        }
        Target::Mysql(url) => {
            #[cfg(feature = "mysql")]
            return run_on::<diesel::MysqlConnection>(&url, args);
            #[cfg(not(feature = "mysql"))]
            return Err(not_built(&url, "mysql"));
        }
        Target::Sqlite(path) => {
            // Only `migrate` may create the file: a mistyped path must not leave an empty
            // database behind (SQLite creates a missing file on open).
            let creates = matches!(args.command, Command::Operation(Operation::Migrate));
            let named = path != ":memory:" && !path.starts_with("file:");
            if !creates && named && !std::path::Path::new(&path).exists() {
                return Err(CliError::NoSqliteFile(path));
            }
            #[cfg(feature = "sqlite")]
            return run_on::<diesel::SqliteConnection>(&path, args);
            #[cfg(not(feature = "sqlite"))]
            return Err(not_built(&path, "sqlite"));
        }
    }
}

// Unused when every backend is built in.
#[allow(dead_code)]
fn not_built(url: &str, feature: &'static str) -> CliError {
    CliError::BackendNotBuilt {
        url: redact(url),
        feature,
    }
}

fn run_on<C: Backend>(url: &str, args: Args) -> Result<(), CliError> {
    let mut conn = connect::<C>(url)?;
    match args.command {
        Command::Relay(relay) => {
            // One connection first: an unreachable database or a missing schema fails at once,
            // in one line, instead of after the pool's 30 s timeout.
            let probe = waybill_outbox_core::MessageId::new();
            waybill_diesel::find_message(&mut conn, probe)?;
            drop(conn);
            crate::relay::run::<C>(url, *relay)
        }
        Command::Operation(operation) => crate::operate::operate(&mut conn, operation, args.json),
    }
}

/// One prepared connection to `url`.
fn connect<C: Backend>(url: &str) -> Result<C, CliError> {
    let mut conn = C::establish(url).map_err(|source| CliError::Connect {
        url: redact(url),
        source,
    })?;
    C::prepare(&mut conn)?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_pick_the_backend_and_unknown_ones_are_refused() {
        let pg = "postgres://u@h/db";
        assert_eq!(target(pg).ok(), Some(Target::Postgres(pg.into())));
        assert_eq!(
            target("mariadb://u@h/db").ok(),
            Some(Target::Mysql("mysql://u@h/db".into()))
        );
        assert_eq!(
            target("sqlite:///tmp/a.db").ok(),
            Some(Target::Sqlite("/tmp/a.db".into()))
        );
        assert_eq!(target("a.db").ok(), Some(Target::Sqlite("a.db".into())));
        for refused in ["", "  ", "redis://h:6379", "sqlite://", "http://h/db"] {
            assert!(target(refused).is_err(), "{refused:?}");
        }
    }
}
