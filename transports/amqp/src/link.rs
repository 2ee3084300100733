//! The private runtime and the connection + channel pair both halves of the transport own.

use std::future::Future;
use std::time::Duration;

use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::runtime::Runtime;

use crate::{redact, Error, Result, TlsOptions};

/// How long closing a connection may take before it is abandoned.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// A small multi-threaded runtime: lapin's I/O loop keeps running on its worker while the
/// caller's thread runs a (blocking) handler between two `block_on` calls.
pub(crate) fn runtime() -> Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("waybill-amqp")
        .enable_all()
        .build()
        .map_err(Error::Runtime)
}

/// Runs `future` with a deadline.
pub(crate) async fn within<T>(
    operation: &'static str,
    timeout: Duration,
    future: impl Future<Output = lapin::Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, future).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(Error::Timeout { operation, timeout }),
    }
}

/// A new channel on `connection`, in confirm mode.
async fn confirmed_channel(connection: &Connection, timeout: Duration) -> Result<Channel> {
    let channel = within("opening a channel", timeout, connection.create_channel()).await?;
    within(
        "enabling publisher confirms",
        timeout,
        channel.confirm_select(ConfirmSelectOptions::default()),
    )
    .await?;
    Ok(channel)
}

/// An open connection and one channel on it, in confirm mode.
#[derive(Debug)]
pub(crate) struct Link {
    pub(crate) connection: Connection,
    pub(crate) channel: Channel,
}

impl Link {
    /// Connects to `addr` (with `tls` for `amqps://`), opens a channel and enables publisher
    /// confirms on it.
    pub(crate) async fn open(addr: &str, tls: &TlsOptions, timeout: Duration) -> Result<Self> {
        let connection = within(
            "connecting",
            timeout,
            Connection::connect_with_config(
                addr,
                ConnectionProperties::default(),
                tls.load()?,
                lapin::runtime::default_runtime()?,
            ),
        )
        .await?;
        let channel = confirmed_channel(&connection, timeout).await?;
        log::debug!("connected to {}", redact(addr));
        Ok(Self {
            connection,
            channel,
        })
    }

    /// Replaces a channel the broker closed with a new one on the same connection, in confirm
    /// mode.
    pub(crate) async fn reopen_channel(&mut self, timeout: Duration) -> Result<()> {
        self.channel = confirmed_channel(&self.connection, timeout).await?;
        Ok(())
    }

    /// The largest frame the connection negotiated, in bytes (overhead included).
    pub(crate) fn frame_max(&self) -> usize {
        self.connection.configuration().frame_max() as usize
    }

    /// `true` while both the connection and the channel are usable.
    pub(crate) fn is_open(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }

    /// Closes the connection, best effort: a connection that is already gone is fine.
    pub(crate) async fn close(&self) {
        if !self.connection.status().connected() {
            return;
        }
        match tokio::time::timeout(CLOSE_TIMEOUT, self.connection.close(200, "OK".into())).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => log::debug!("closing the AMQP connection failed: {error}"),
            Err(_) => log::debug!("closing the AMQP connection timed out"),
        }
    }
}
