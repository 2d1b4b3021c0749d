//! The device's side of the tunnel: where decrypted packets go and where packets to the
//! overlay come from. Either a TUN interface with the overlay address (the kernel serves
//! every local service), or the userspace TCP stack (floto-netstack) that accepts
//! connections on the overlay address and forwards only the listed ports to local
//! addresses. Both are seen by the driver as two packet queues.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::config::{Forward, Mode};

/// Largest IP packet in the overlay (WireGuard's usual MTU).
pub(super) const MTU: u16 = 1420;

/// Packets queued between the tunnel and the local side, each way.
const QUEUE: usize = 1024;

/// The local side, as two queues of IPv4 packets.
pub(super) struct LocalSide {
    /// Decrypted packets for the device (drop when full, as a NIC would).
    pub(super) to_local: mpsc::Sender<Vec<u8>>,
    /// Packets the device sends into the overlay.
    pub(super) from_local: mpsc::Receiver<Vec<u8>>,
}

/// Opens the local side in `mode`. Its tasks stop with `shutdown`.
pub(super) async fn open(
    mode: Mode,
    tun_name: &str,
    address: Ipv4Addr,
    prefix_len: u8,
    forwards: &[Forward],
    shutdown: &CancellationToken,
) -> anyhow::Result<LocalSide> {
    match mode {
        Mode::Tun => open_tun(tun_name, address, prefix_len, shutdown),
        Mode::Userspace => open_userspace(address, prefix_len, forwards, shutdown).await,
    }
}

fn open_tun(
    name: &str,
    address: Ipv4Addr,
    prefix_len: u8,
    shutdown: &CancellationToken,
) -> anyhow::Result<LocalSide> {
    let dev = tun_rs::DeviceBuilder::new()
        .name(name)
        .ipv4(address, prefix_len, None)
        .mtu(MTU)
        .build_async()
        .with_context(|| {
            format!("creating TUN interface {name} (needs root or CAP_NET_ADMIN, and /dev/net/tun; --userspace needs neither)")
        })?;
    let dev = Arc::new(dev);
    info!(interface = name, %address, prefix_len, "TUN interface up");
    let (to_local, mut to_tun) = mpsc::channel::<Vec<u8>>(QUEUE);
    let (from_tun, from_local) = mpsc::channel::<Vec<u8>>(QUEUE);
    let reader = dev.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; usize::from(MTU) + 100];
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                r = reader.recv(&mut buf) => match r {
                    Ok(n) => {
                        if from_tun.send(buf[..n].to_vec()).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "reading the TUN interface failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    });
    let stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                p = to_tun.recv() => match p {
                    Some(p) => {
                        if let Err(e) = dev.send(&p).await {
                            debug!(error = %e, "writing to the TUN interface failed");
                        }
                    }
                    None => break,
                },
            }
        }
    });
    Ok(LocalSide {
        to_local,
        from_local,
    })
}

async fn open_userspace(
    address: Ipv4Addr,
    prefix_len: u8,
    forwards: &[Forward],
    shutdown: &CancellationToken,
) -> anyhow::Result<LocalSide> {
    let (to_local, inbound) = mpsc::channel::<Vec<u8>>(QUEUE);
    let (out_tx, from_local) = mpsc::channel::<Vec<u8>>(QUEUE);
    let mut config = floto_netstack::Config::new(address, prefix_len);
    config.mtu = usize::from(MTU);
    let (stack, driver) = floto_netstack::new(config, inbound, move |p: &[u8]| {
        // Never block the stack: a full queue drops the packet and TCP retransmits.
        let _ = out_tx.try_send(p.to_vec());
    });
    tokio::spawn(driver.run(shutdown.clone()));
    for forward in forwards {
        let mut listener = stack
            .listen(forward.port)
            .await
            .with_context(|| format!("listening on overlay port {}", forward.port))?;
        let target = forward.target.clone();
        let port = forward.port;
        let stop = shutdown.clone();
        info!(port, %target, "forwarding overlay port");
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => break,
                    a = listener.accept() => a,
                };
                let (mut inbound, from) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(port, error = %e, "accepting on the overlay failed");
                        break;
                    }
                };
                let target = target.clone();
                tokio::spawn(async move {
                    match tokio::net::TcpStream::connect(&target).await {
                        Ok(mut local) => {
                            debug!(%from, port, %target, "forwarding a connection");
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut local).await;
                        }
                        Err(e) => {
                            warn!(%from, port, %target, error = %e, "cannot reach the forwarded service");
                        }
                    }
                });
            }
        });
    }
    Ok(LocalSide {
        to_local,
        from_local,
    })
}
