//! A TCP proxy to the broker that a test can cut: every connection through it closed and new
//! ones refused, as when the network or the broker goes away.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// A TCP proxy to the broker on a local port. [`cut`](Self::cut) closes every connection
/// through it and stops listening (connecting is refused); [`restore`](Self::restore) listens on
/// the same port again.
pub struct Proxy {
    port: u16,
    target: String,
    streams: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<(JoinHandle<()>, Arc<Mutex<bool>>)>,
}

impl Proxy {
    pub fn start(target: &str) -> Self {
        let mut proxy = Self {
            port: 0,
            target: target.to_owned(),
            streams: Arc::default(),
            acceptor: None,
        };
        proxy.listen(TcpListener::bind("127.0.0.1:0").unwrap());
        proxy
    }

    fn listen(&mut self, listener: TcpListener) {
        self.port = listener.local_addr().unwrap().port();
        let stopped = Arc::new(Mutex::new(false));
        let (streams, target, stop) = (self.streams.clone(), self.target.clone(), stopped.clone());
        let acceptor = std::thread::spawn(move || {
            for client in listener.incoming() {
                if *stop.lock().unwrap() {
                    return; // dropping the listener refuses new connections
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let mut streams = streams.lock().unwrap();
                streams.push(client.try_clone().unwrap());
                streams.push(server.try_clone().unwrap());
                pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                pipe(server, client);
            }
        });
        self.acceptor = Some((acceptor, stopped));
    }

    /// The broker URL through the proxy: `addr` with its host and port replaced.
    pub fn url(&self, addr: &str) -> String {
        let (scheme, rest) = addr.split_once("://").unwrap();
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let credentials = authority
            .rsplit_once('@')
            .map(|(c, _)| format!("{c}@"))
            .unwrap_or_default();
        format!("{scheme}://{credentials}127.0.0.1:{}/{path}", self.port)
    }

    pub fn cut(&mut self) {
        if let Some((acceptor, stopped)) = self.acceptor.take() {
            *stopped.lock().unwrap() = true;
            // Wake the acceptor so it sees the flag and drops the listener.
            let _ = TcpStream::connect(("127.0.0.1", self.port));
            acceptor.join().unwrap();
        }
        for stream in self.streams.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    pub fn restore(&mut self) {
        self.listen(TcpListener::bind(("127.0.0.1", self.port)).unwrap());
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}

/// Copies bytes from `from` to `to` on a thread until either side closes.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buffer = [0; 16 * 1024];
        while let Ok(n) = from.read(&mut buffer) {
            if n == 0 || to.write_all(&buffer[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

/// The `host:port` of the broker at `addr`.
pub fn host_port(addr: &str) -> String {
    let rest = addr.split_once("://").unwrap().1;
    let authority = rest.split_once('/').map_or(rest, |(a, _)| a);
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:5672")
    }
}
