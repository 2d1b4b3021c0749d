//! The server's userspace TCP stack on its overlay address, used only to dial devices for
//! broker sessions: packets the concentrator decapsulates for the server's address come
//! in; what the stack sends goes out through the concentrator.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use floto_netstack::{ConnectError, TcpStream};

use crate::wg::{peers::MAX_DATAGRAM, Concentrator, Effects, HostQueue, SendBatch};

/// Dials devices.
#[derive(Clone)]
pub struct NetstackHandle {
    inner: floto_netstack::NetstackHandle,
}

impl std::fmt::Debug for NetstackHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NetstackHandle")
    }
}

impl NetstackHandle {
    /// Opens a TCP connection from the server's overlay address to a device.
    pub async fn connect(
        &self,
        device: Ipv4Addr,
        port: u16,
        timeout: Duration,
    ) -> Result<TcpStream, ConnectError> {
        self.inner
            .connect(SocketAddrV4::new(device, port), timeout)
            .await
    }
}

/// Encrypts the stack's packets as they come and sends the datagrams of each driver round
/// together (UDP segmentation offload for runs to one device).
struct Sink {
    concentrator: Arc<Concentrator>,
    scratch: Vec<u8>,
    effects: Effects,
    batch: SendBatch,
}

impl floto_netstack::PacketSink for Sink {
    fn send(&mut self, packet: &[u8]) {
        self.concentrator.send_to_device(
            packet,
            &mut self.scratch,
            &mut self.effects,
            &mut self.batch,
        );
    }

    fn flush(&mut self) {
        self.concentrator.flush(&mut self.batch);
    }
}

/// Packets handed from the fair host queue to the stack's driver at most at once.
const TO_STACK: usize = 256;

/// The stack's driver task, and the task that feeds it from the concentrator's fair
/// per-device queue.
pub struct Netstack {
    driver: floto_netstack::NetstackDriver,
    from_devices: Arc<HostQueue>,
    to_stack: mpsc::Sender<Vec<u8>>,
}

impl Netstack {
    /// A stack on the server's address in each overlay network (the first network's
    /// first), fed by the concentrator's host packets and sending through it.
    pub fn new(
        overlays: &floto_registry::Overlays,
        concentrator: Arc<Concentrator>,
        from_devices: Arc<HostQueue>,
    ) -> (NetstackHandle, Netstack) {
        let sink = Sink {
            concentrator,
            scratch: vec![0u8; MAX_DATAGRAM],
            effects: Effects::new(),
            batch: SendBatch::new(),
        };
        let (to_stack, stack_input) = mpsc::channel(TO_STACK);
        let address_in =
            |n: &ipnet::Ipv4Net| (floto_registry::rules::server_address(*n), n.prefix_len());
        let (first, prefix) = address_in(&overlays.first());
        let mut config = floto_netstack::Config::new(first, prefix);
        config.more_addresses = overlays.networks()[1..].iter().map(address_in).collect();
        let (inner, driver) = floto_netstack::new(config, stack_input, sink);
        (
            NetstackHandle { inner },
            Netstack {
                driver,
                from_devices,
                to_stack,
            },
        )
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let Netstack {
            driver,
            from_devices,
            to_stack,
        } = self;
        let feed = async {
            loop {
                let packet = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    p = from_devices.pop() => p,
                };
                if to_stack.send(packet).await.is_err() {
                    return;
                }
            }
        };
        tokio::join!(driver.run(shutdown.clone()), feed);
    }
}
