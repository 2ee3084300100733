//! Hand-written SQL that the connection keeps prepared.
//!
//! diesel never caches a `sql_query` as a prepared statement: it cannot know whether the SQL
//! text is built at run time, and an unbounded number of texts would fill the cache. The
//! relay's statements are constants and run on every batch, so parsing and planning them each
//! time is pure overhead (about a third of a millisecond per statement on PostgreSQL).

use diesel::backend::Backend;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::{QueryResult, RunQueryDsl};

/// Wraps a `sql_query(CONSTANT).bind(..)..` so that diesel caches it as a prepared statement,
/// keyed by its SQL text. Only for SQL texts that are `const`: every distinct text stays in
/// the connection's cache for the connection's lifetime.
///
/// Run it with `load` or `get_result`: `execute` hands diesel a reference, whose
/// `QueryFragment` does not forward the promise below, so it would not be cached. A write that
/// must be prepared returns its count from a CTE instead.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Prepared<Q>(pub(crate) Q);

impl<Q, DB> QueryFragment<DB> for Prepared<Q>
where
    DB: Backend,
    Q: QueryFragment<DB>,
{
    fn walk_ast<'b>(&'b self, pass: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        self.0.walk_ast(pass)
    }

    fn is_safe_to_cache_prepared(&self, _backend: &DB) -> QueryResult<bool> {
        // The one promise diesel cannot check: the SQL text is a constant.
        Ok(true)
    }
}

impl<Q> QueryId for Prepared<Q> {
    type QueryId = ();
    // No static id: the cache is keyed by the SQL text and the bind types.
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q: Query> Query for Prepared<Q> {
    type SqlType = Q::SqlType;
}

impl<Q, Conn> RunQueryDsl<Conn> for Prepared<Q> {}
