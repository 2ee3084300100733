//! A TCP proxy between the workers and the broker, so the fault schedule can cut every broker
//! connection at once and hold the broker unreachable for a stretch, whatever the broker.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use crate::Error;

/// A running proxy to one upstream address.
#[derive(Debug)]
pub(crate) struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    open: Mutex<Vec<TcpStream>>,
    refusing: AtomicBool,
}

impl Proxy {
    /// Listens on a free loopback port and forwards every connection to `upstream`.
    ///
    /// # Errors
    ///
    /// No port to listen on, or `upstream` does not resolve.
    pub(crate) fn start(upstream: &str) -> Result<Self, Error> {
        let target = upstream
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| format!("{upstream} does not resolve"))?;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let accepting = Arc::clone(&shared);
        thread::Builder::new()
            .name("audit-proxy".into())
            .spawn(move || {
                for client in listener.incoming().flatten() {
                    if accepting.refusing.load(Ordering::SeqCst) {
                        drop(client); // the broker is "down": close at once
                        continue;
                    }
                    if let Err(error) = accepting.forward(client, target) {
                        log::debug!("proxy: {error}");
                    }
                }
            })?;
        Ok(Self { addr, shared })
    }

    /// Where clients connect.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every open connection (both ends), like a network failure.
    pub(crate) fn cut(&self) {
        let open = std::mem::take(&mut *self.shared.lock());
        for stream in open {
            // Already closed streams fail here; nothing to do about them.
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// While `true`, new connections are closed as soon as they arrive (the broker is down).
    pub(crate) fn refuse(&self, refusing: bool) {
        self.shared.refusing.store(refusing, Ordering::SeqCst);
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<TcpStream>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn forward(&self, client: TcpStream, target: SocketAddr) -> io::Result<()> {
        let server = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
        client.set_nodelay(true)?;
        server.set_nodelay(true)?;
        {
            let mut open = self.lock();
            open.retain(|stream| stream.peer_addr().is_ok());
            open.push(client.try_clone()?);
            open.push(server.try_clone()?);
        }
        pump(client.try_clone()?, server.try_clone()?)?;
        pump(server, client)?;
        Ok(())
    }
}

/// Copies `from` to `to` on a thread; when either side ends, both are shut down.
fn pump(mut from: TcpStream, mut to: TcpStream) -> io::Result<()> {
    thread::Builder::new()
        .name("audit-proxy-pump".into())
        .spawn(move || {
            // Ends on close or on a cut; either way both sides go down together.
            let _ = io::copy(&mut from, &mut to);
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
        })?;
    Ok(())
}

/// `url` with its host and port replaced by `addr`, and the host:port it named.
///
/// # Errors
///
/// A URL without `scheme://`.
pub(crate) fn through(url: &str, addr: SocketAddr) -> Result<(String, String), Error> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or("a broker URL needs scheme://")?;
    let (authority, path) = rest.find('/').map_or((rest, ""), |at| rest.split_at(at));
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((user, host)) => (format!("{user}@"), host),
        None => (String::new(), authority),
    };
    let upstream = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        let port = match scheme {
            "nats" => 4222,
            "kafka" => 9092,
            _ => 5672,
        };
        format!("{hostport}:{port}")
    };
    Ok((format!("{scheme}://{userinfo}{addr}{path}"), upstream))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rewrites_host_and_port_and_keeps_the_rest() {
        let addr: SocketAddr = "127.0.0.1:9999".parse().unwrap();
        let (url, upstream) = through("amqp://guest:guest@127.0.0.1:5672/%2f", addr).unwrap();
        assert_eq!(url, "amqp://guest:guest@127.0.0.1:9999/%2f");
        assert_eq!(upstream, "127.0.0.1:5672");
        let (url, upstream) = through("nats://localhost", addr).unwrap();
        assert_eq!(url, "nats://127.0.0.1:9999");
        assert_eq!(upstream, "localhost:4222");
    }
}
