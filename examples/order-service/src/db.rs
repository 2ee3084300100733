//! Each service's own tables, and the connection types the example runs on.
//!
//! The SQL of the service's writes is diesel's query builder, so it is the same on every
//! backend; only the `CREATE TABLE` statements differ. [`AppConnection`] is implemented once
//! per connection type by a macro, and everything else in the example is generic over it.

use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool, R2D2Connection};
use diesel::sql_types::BigInt;
use waybill_diesel::sqlite::SqliteOptions;
use waybill_diesel::{InboxConnection, OutboxConnection};

use crate::Error;

diesel::table! {
    /// The orders service's orders.
    orders (id) {
        id -> BigInt,
        customer -> Text,
        amount_cents -> BigInt,
        paid -> Bool,
    }
}

diesel::table! {
    /// The billing service's ledger: one row per charge taken.
    charges (id) {
        id -> BigInt,
        order_id -> BigInt,
        amount_cents -> BigInt,
    }
}

diesel::table! {
    /// One row per delivery an inbox skipped as a duplicate, so the count survives processes.
    inbox_duplicates (id) {
        id -> BigInt,
        consumer -> Text,
    }
}

/// An order as stored and as the HTTP API returns it.
#[derive(Clone, Debug, PartialEq, Eq, Queryable, Selectable, serde::Serialize)]
#[diesel(table_name = orders)]
pub(crate) struct Order {
    /// The order's id, assigned by the database.
    pub(crate) id: i64,
    /// Who ordered.
    pub(crate) customer: String,
    /// The total to charge.
    pub(crate) amount_cents: i64,
    /// Whether billing reported the payment captured.
    pub(crate) paid: bool,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// A pool of connections of type `C`.
pub(crate) type DbPool<C> = Pool<ConnectionManager<C>>;

/// A connection the example's services can work on: the outbox, the inbox and the app's tables.
pub(crate) trait AppConnection:
    Connection + R2D2Connection + OutboxConnection + InboxConnection + Send + Sized + 'static
{
    /// Creates the orders service's tables if they do not exist.
    fn create_orders_tables(&mut self) -> QueryResult<()>;
    /// Creates the billing service's tables if they do not exist.
    fn create_billing_tables(&mut self) -> QueryResult<()>;
    /// Inserts a new unpaid order and returns it.
    fn insert_order(&mut self, customer: &str, amount_cents: i64) -> QueryResult<Order>;
    /// The order `id`, if there is one.
    fn find_order(&mut self, id: i64) -> QueryResult<Option<Order>>;
    /// Marks order `id` paid; returns how many rows changed.
    fn mark_paid(&mut self, id: i64) -> QueryResult<usize>;
    /// Appends a charge to the ledger and returns its id.
    fn insert_charge(&mut self, order_id: i64, amount_cents: i64) -> QueryResult<i64>;
    /// Records that `consumer`'s inbox skipped a duplicate delivery.
    fn record_duplicate(&mut self, consumer: &str) -> QueryResult<()>;
    /// Runs `sql`, a portable `SELECT count(*) AS n ...`.
    fn count(&mut self, sql: &str) -> QueryResult<i64>;
    /// Opens a pool of at most `size` connections to `url`.
    ///
    /// # Errors
    ///
    /// The pool could not open its first connection.
    fn pool(url: &str, size: u32) -> Result<DbPool<Self>, Error>;
}

/// Tables common to both services, then each service's own.
const PG_TABLES: [&str; 3] = [
    "CREATE TABLE IF NOT EXISTS inbox_duplicates (id BIGSERIAL PRIMARY KEY, consumer TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS orders (id BIGSERIAL PRIMARY KEY, customer TEXT NOT NULL, \
     amount_cents BIGINT NOT NULL CHECK (amount_cents > 0), paid BOOLEAN NOT NULL DEFAULT FALSE)",
    // Deliberately no unique constraint on order_id: only the inbox prevents a double charge.
    "CREATE TABLE IF NOT EXISTS charges (id BIGSERIAL PRIMARY KEY, order_id BIGINT NOT NULL, \
     amount_cents BIGINT NOT NULL)",
];

const SQLITE_TABLES: [&str; 3] = [
    "CREATE TABLE IF NOT EXISTS inbox_duplicates (id INTEGER PRIMARY KEY, consumer TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, customer TEXT NOT NULL, \
     amount_cents INTEGER NOT NULL CHECK (amount_cents > 0), paid BOOLEAN NOT NULL DEFAULT FALSE)",
    // Deliberately no unique constraint on order_id: only the inbox prevents a double charge.
    "CREATE TABLE IF NOT EXISTS charges (id INTEGER PRIMARY KEY, order_id INTEGER NOT NULL, \
     amount_cents INTEGER NOT NULL)",
];

#[cfg(feature = "mysql")]
const MYSQL_TABLES: [&str; 3] = [
    "CREATE TABLE IF NOT EXISTS inbox_duplicates (id BIGINT AUTO_INCREMENT PRIMARY KEY, \
     consumer TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS orders (id BIGINT AUTO_INCREMENT PRIMARY KEY, \
     customer TEXT NOT NULL, amount_cents BIGINT NOT NULL CHECK (amount_cents > 0), \
     paid BOOLEAN NOT NULL DEFAULT FALSE)",
    // Deliberately no unique constraint on order_id: only the inbox prevents a double charge.
    "CREATE TABLE IF NOT EXISTS charges (id BIGINT AUTO_INCREMENT PRIMARY KEY, \
     order_id BIGINT NOT NULL, amount_cents BIGINT NOT NULL)",
];

/// The two inserts that return the new row's id: with `RETURNING` where the backend has it,
/// else with `LAST_INSERT_ID()`, which is per connection and so safe under concurrency.
macro_rules! inserts {
    (returning) => {
        fn insert_order(&mut self, customer: &str, amount_cents: i64) -> QueryResult<Order> {
            diesel::insert_into(orders::table)
                .values(new_order(customer, amount_cents))
                .returning(Order::as_returning())
                .get_result(self)
        }

        fn insert_charge(&mut self, order_id: i64, amount_cents: i64) -> QueryResult<i64> {
            diesel::insert_into(charges::table)
                .values(new_charge(order_id, amount_cents))
                .returning(charges::id)
                .get_result(self)
        }
    };
    (last_insert_id) => {
        fn insert_order(&mut self, customer: &str, amount_cents: i64) -> QueryResult<Order> {
            diesel::insert_into(orders::table)
                .values(new_order(customer, amount_cents))
                .execute(self)?;
            Ok(Order {
                id: last_insert_id(self)?,
                customer: customer.to_owned(),
                amount_cents,
                paid: false,
            })
        }

        fn insert_charge(&mut self, order_id: i64, amount_cents: i64) -> QueryResult<i64> {
            diesel::insert_into(charges::table)
                .values(new_charge(order_id, amount_cents))
                .execute(self)?;
            last_insert_id(self)
        }
    };
}

macro_rules! impl_app_connection {
    ($conn:ty, $tables:expr, $pool:expr, $inserts:ident) => {
        impl AppConnection for $conn {
            fn create_orders_tables(&mut self) -> QueryResult<()> {
                diesel::sql_query($tables[0]).execute(self)?;
                diesel::sql_query($tables[1]).execute(self)?;
                Ok(())
            }

            fn create_billing_tables(&mut self) -> QueryResult<()> {
                diesel::sql_query($tables[0]).execute(self)?;
                diesel::sql_query($tables[2]).execute(self)?;
                Ok(())
            }

            inserts!($inserts);

            fn find_order(&mut self, id: i64) -> QueryResult<Option<Order>> {
                orders::table
                    .find(id)
                    .select(Order::as_select())
                    .first(self)
                    .optional()
            }

            fn mark_paid(&mut self, id: i64) -> QueryResult<usize> {
                diesel::update(orders::table.find(id))
                    .set(orders::paid.eq(true))
                    .execute(self)
            }

            fn record_duplicate(&mut self, consumer: &str) -> QueryResult<()> {
                diesel::insert_into(inbox_duplicates::table)
                    .values(inbox_duplicates::consumer.eq(consumer))
                    .execute(self)?;
                Ok(())
            }

            fn count(&mut self, sql: &str) -> QueryResult<i64> {
                Ok(diesel::sql_query(sql).get_result::<Count>(self)?.n)
            }

            fn pool(url: &str, size: u32) -> Result<DbPool<Self>, Error> {
                $pool(url, size)
            }
        }
    };
}

/// The values of a new, unpaid order.
#[allow(clippy::type_complexity)] // diesel's own tuple of assignments
fn new_order(
    customer: &str,
    amount_cents: i64,
) -> (
    diesel::dsl::Eq<orders::customer, &str>,
    diesel::dsl::Eq<orders::amount_cents, i64>,
    diesel::dsl::Eq<orders::paid, bool>,
) {
    (
        orders::customer.eq(customer),
        orders::amount_cents.eq(amount_cents),
        orders::paid.eq(false),
    )
}

/// The values of a new charge.
fn new_charge(
    order_id: i64,
    amount_cents: i64,
) -> (
    diesel::dsl::Eq<charges::order_id, i64>,
    diesel::dsl::Eq<charges::amount_cents, i64>,
) {
    (
        charges::order_id.eq(order_id),
        charges::amount_cents.eq(amount_cents),
    )
}

#[cfg(feature = "mysql")]
fn last_insert_id(conn: &mut diesel::MysqlConnection) -> QueryResult<i64> {
    diesel::select(diesel::dsl::sql::<BigInt>("LAST_INSERT_ID()")).get_result(conn)
}

/// A pool on a database server (PostgreSQL, MySQL).
fn server_pool<C: R2D2Connection + 'static>(url: &str, size: u32) -> Result<DbPool<C>, Error> {
    Ok(Pool::builder()
        .max_size(size)
        .build(ConnectionManager::new(url))?)
}

/// A pool on a SQLite file, created with its folder if missing.
fn sqlite_pool(path: &str, size: u32) -> Result<DbPool<SqliteConnection>, Error> {
    // SQLite creates the file but not its folder; without one the pool would only time out.
    let folder = std::path::Path::new(path).parent();
    if let Some(folder) = folder.filter(|folder| !folder.as_os_str().is_empty()) {
        std::fs::create_dir_all(folder)
            .map_err(|error| format!("creating {}: {error}", folder.display()))?;
    }
    // SQLite has one writer at a time: WAL plus a busy timeout make the others wait their turn.
    Ok(Pool::builder()
        .max_size(size)
        .connection_customizer(Box::new(SqliteOptions::default()))
        .build(ConnectionManager::new(path))?)
}

impl_app_connection!(PgConnection, PG_TABLES, server_pool, returning);
impl_app_connection!(SqliteConnection, SQLITE_TABLES, sqlite_pool, returning);
#[cfg(feature = "mysql")]
impl_app_connection!(
    diesel::MysqlConnection,
    MYSQL_TABLES,
    server_pool,
    last_insert_id
);

/// Which database a URL names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Backend {
    /// `postgres://` or `postgresql://`.
    Postgres,
    /// `sqlite://PATH` or a plain file path.
    Sqlite,
    /// `mysql://` (MySQL 8 or MariaDB 10.6+), in a build with the `mysql` feature.
    #[cfg(feature = "mysql")]
    Mysql,
}

/// Tells the backend from the URL's scheme, and returns the URL as diesel wants it.
///
/// # Errors
///
/// Unknown schemes, and MySQL URLs in a build without the `mysql` feature.
pub(crate) fn parse_url(url: &str) -> Result<(Backend, String), Error> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok((Backend::Postgres, url.to_owned()))
    } else if let Some(path) = url.strip_prefix("sqlite://") {
        Ok((Backend::Sqlite, path.to_owned()))
    } else if url.starts_with("mysql://") {
        mysql_url(url)
    } else if url.contains("://") {
        Err(format!(
            "unknown database URL scheme in {url:?}: use postgres://, mysql:// or a SQLite path"
        )
        .into())
    } else {
        Ok((Backend::Sqlite, url.to_owned()))
    }
}

#[cfg(feature = "mysql")]
fn mysql_url(url: &str) -> Result<(Backend, String), Error> {
    Ok((Backend::Mysql, url.to_owned()))
}

#[cfg(not(feature = "mysql"))]
fn mysql_url(_url: &str) -> Result<(Backend, String), Error> {
    Err(
        "this build has no MySQL/MariaDB support: build the example with `--features mysql` \
         (needs libmariadb-dev), or use postgres:// or a SQLite path"
            .into(),
    )
}
