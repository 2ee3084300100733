//! Picks the backend from the database URL and runs the command on it.

use diesel::r2d2::{CustomizeConnection, R2D2Connection};
use diesel::Connection;
use waybill_diesel::OpsConnection;

use crate::cli::{Args, Command};
use crate::error::CliError;
use waybill_outbox_core::redact_url as redact;

/// A database the binary can work on.
pub(crate) trait Backend:
    OpsConnection + R2D2Connection + Connection + Send + 'static
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

/// Runs `args.command` on the database `args.database_url` names.
pub(crate) fn run(args: Args) -> Result<(), CliError> {
    let url = args.database_url.clone().ok_or(CliError::NoDatabase)?;
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        #[cfg(feature = "postgres")]
        return run_on::<diesel::PgConnection>(&url, args);
        #[cfg(not(feature = "postgres"))]
        return Err(not_built(&url, "postgres"));
    }
    if url.starts_with("mysql://") || url.starts_with("mariadb://") {
        #[cfg(feature = "mysql")]
        return run_on::<diesel::MysqlConnection>(&url.replacen("mariadb://", "mysql://", 1), args);
        #[cfg(not(feature = "mysql"))]
        return Err(not_built(&url, "mysql"));
    }
    let path = url.strip_prefix("sqlite://").unwrap_or(&url).to_owned();
    #[cfg(feature = "sqlite")]
    return run_on::<diesel::SqliteConnection>(&path, args);
    #[cfg(not(feature = "sqlite"))]
    {
        let _ = path;
        Err(not_built(&url, "sqlite"))
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
    match args.command {
        Command::Relay(relay) => crate::relay::run::<C>(url, *relay),
        Command::Operation(operation) => {
            let mut conn = C::establish(url).map_err(|source| CliError::Connect {
                url: redact(url),
                source,
            })?;
            C::prepare(&mut conn)?;
            crate::operate::operate(&mut conn, operation, args.json)
        }
    }
}
