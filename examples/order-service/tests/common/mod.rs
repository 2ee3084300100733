//! Helpers shared by the tests: running the binary, servers or skipping, plain HTTP.
#![allow(dead_code, unreachable_pub)]

/// The one skip line of every suite.
#[path = "../../../../transports/testkit/src/skip.rs"]
mod skip_line;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

/// The example's binary.
pub fn order_service() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_order-service"));
    for var in [
        "ORDERS_DATABASE_URL",
        "BILLING_DATABASE_URL",
        "BROKER_URL",
        "BROKER_NAMESPACE",
    ] {
        command.env_remove(var);
    }
    command.env("RUST_LOG", "warn");
    command
}

/// Skips the test (returns `None`) when a server is missing, unless `WAYBILL_REQUIRE_SERVERS=1`.
pub fn require<T>(what: &str, found: Result<T, String>) -> Option<T> {
    match found {
        Ok(value) => Some(value),
        Err(error) => {
            skip_line::skip(what, skip_line::variable_for(what), &error);
            None
        }
    }
}

/// A database made for one test, dropped again when the value is.
pub struct TestDatabase {
    /// Its URL, for `--orders-db` / `--billing-db`.
    pub url: String,
    drop: Option<Box<dyn FnOnce()>>,
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Some(drop) = self.drop.take() {
            drop();
        }
    }
}

/// A fresh PostgreSQL database on `PG_DATABASE_URL`'s server.
pub fn pg_database(name: &str) -> Result<TestDatabase, String> {
    let base = std::env::var("PG_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    server_database::<diesel::PgConnection>(&base, name, "WITH (FORCE)")
}

/// A fresh MySQL/MariaDB database on `MYSQL_DATABASE_URL`'s server.
#[cfg(feature = "mysql")]
pub fn mysql_database(name: &str) -> Result<TestDatabase, String> {
    let base = std::env::var("MYSQL_DATABASE_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned());
    server_database::<diesel::MysqlConnection>(&base, name, "")
}

/// Creates database `name` next to `base`'s; `force` ends what still uses it when it is dropped.
fn server_database<C: diesel::Connection + 'static>(
    base: &str,
    name: &str,
    force: &'static str,
) -> Result<TestDatabase, String> {
    let mut admin = C::establish(base).map_err(|e| format!("{base}: {e}"))?;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .map_err(|e| e.to_string())?;
    let server = base.rsplit_once('/').map_or(base, |(server, _)| server);
    let name = name.to_owned();
    Ok(TestDatabase {
        url: format!("{server}/{name}"),
        drop: Some(Box::new(move || {
            let dropped = admin.batch_execute(&format!("DROP DATABASE {name} {force}"));
            if let Err(error) = dropped {
                let _ = writeln!(std::io::stderr(), "dropping test database {name}: {error}");
            }
        })),
    })
}

/// Whether something listens on `addr` (`host:port`).
pub fn reachable(addr: &str) -> Result<(), String> {
    TcpStream::connect(addr)
        .map(drop)
        .map_err(|e| format!("{addr}: {e}"))
}

/// Starts `serve-orders` with `args` and returns it with the address it listens on.
pub fn serve_orders(args: &[&str]) -> (Child, String) {
    let mut child = order_service()
        .args(args)
        .args(["serve-orders", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    (child, addr)
}

/// One HTTP/1.1 request; returns the status and the body.
pub fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The `report` subcommand's JSON with `args`.
pub fn report(args: &[&str]) -> serde_json::Value {
    let output = order_service().args(args).arg("report").output().unwrap();
    assert!(output.status.success(), "{output:?}");
    serde_json::from_slice(&output.stdout).unwrap()
}
