//! Byte forwarding for the operator: `floto proxy` (stdin/stdout to a device port, the
//! ssh ProxyCommand) and `floto tunnel` (local listeners to device ports).

use std::net::SocketAddr;
use std::str::FromStr;

use tokio::net::TcpListener;
use tracing::{info, warn};

use floto_client::broker::{self, BrokerError, BrokerTarget, Transport};

/// `[LOCAL_ADDR:]LOCAL_PORT:REMOTE_PORT`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardSpec {
    pub local: SocketAddr,
    pub remote_port: u16,
}

impl FromStr for ForwardSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not [LOCAL_ADDR:]LOCAL_PORT:REMOTE_PORT");
        let (local, remote) = s.rsplit_once(':').ok_or_else(bad)?;
        let remote_port: u16 = remote.parse().map_err(|_| bad())?;
        if remote_port == 0 {
            return Err(bad());
        }
        let local = match local.rsplit_once(':') {
            Some((addr, port)) => {
                let addr = addr.trim_start_matches('[').trim_end_matches(']');
                let ip: std::net::IpAddr = addr.parse().map_err(|_| bad())?;
                SocketAddr::new(ip, port.parse().map_err(|_| bad())?)
            }
            None => SocketAddr::from(([127, 0, 0, 1], local.parse().map_err(|_| bad())?)),
        };
        Ok(Self { local, remote_port })
    }
}

/// Splices stdin/stdout with one device port. Ends when the device side ends (so that ssh,
/// whose ProxyCommand this is, sees the connection close: stdout is only really closed by
/// exiting), or when told to stop (ssh sends its ProxyCommand SIGHUP when it exits). When
/// stdin ends first, the write half is closed and the device side may still answer. The
/// broker stream is closed cleanly in every case.
pub async fn proxy_stdio(
    target: &BrokerTarget,
    device: &str,
    port: u16,
    transport: Transport,
) -> Result<(), BrokerError> {
    let stream = broker::open(target, device, port, transport).await?;
    let (stream, result) = splice_stdio(stream).await;
    stream.close().await;
    result.map_err(|e| BrokerError::Transport(format!("forwarding: {e}")))
}

/// Splices stdin/stdout with a stream that `floto ssh` already opened and hands over on the
/// Unix socket at `socket` (see [`crate::ssh`]).
pub async fn attach_stdio(socket: &std::path::Path) -> std::io::Result<()> {
    let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("connecting to {}: {e}", socket.display()))
    })?;
    splice_stdio(stream).await.1
}

/// The copy loop of [`proxy_stdio`], for any stream; gives the stream back for closing.
async fn splice_stdio<S>(stream: S) -> (S, std::io::Result<()>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt as _;
    use tokio::signal::unix::{signal, SignalKind};
    let signals = [
        SignalKind::hangup(),
        SignalKind::terminate(),
        SignalKind::interrupt(),
    ]
    .map(signal);
    let [Ok(mut hup), Ok(mut term), Ok(mut int)] = signals else {
        let e = std::io::Error::other("cannot install signal handlers");
        return (stream, Err(e));
    };
    let (mut from_device, mut to_device) = tokio::io::split(stream);
    let mut stdin = tokio::io::stdin();
    let mut stdout = tokio::io::stdout();
    // The copies borrow the halves; they end with this block, before the halves rejoin.
    let result = {
        let upload = async {
            let r = tokio::io::copy(&mut stdin, &mut to_device).await;
            let _ = to_device.shutdown().await;
            r
        };
        let download = async {
            let r = tokio::io::copy(&mut from_device, &mut stdout).await;
            let _ = stdout.flush().await;
            r
        };
        tokio::pin!(upload, download);
        let mut uploading = true;
        loop {
            tokio::select! {
                r = &mut download => break r.map(drop),
                r = &mut upload, if uploading => match r {
                    Ok(_) => uploading = false,
                    Err(e) => break Err(e),
                },
                _ = hup.recv() => break Ok(()),
                _ = term.recv() => break Ok(()),
                _ = int.recv() => break Ok(()),
            }
        }
    };
    (from_device.unsplit(to_device), result)
}

/// Binds every spec, then forwards each accepted connection through its own broker
/// stream. Runs until the future is dropped. Returns the bound addresses through
/// `on_ready` once listening.
pub async fn tunnel(
    target: BrokerTarget,
    device: String,
    specs: Vec<ForwardSpec>,
    transport: Transport,
    on_ready: impl FnOnce(&[(SocketAddr, u16)]),
) -> std::io::Result<()> {
    let mut listeners = Vec::new();
    for spec in &specs {
        let l = TcpListener::bind(spec.local)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("binding {}: {e}", spec.local)))?;
        listeners.push((l, spec.remote_port));
    }
    let bound: Vec<(SocketAddr, u16)> = listeners
        .iter()
        .filter_map(|(l, p)| Some((l.local_addr().ok()?, *p)))
        .collect();
    on_ready(&bound);
    let mut tasks = tokio::task::JoinSet::new();
    for (listener, remote_port) in listeners {
        let target = target.clone();
        let device = device.clone();
        tasks.spawn(async move {
            loop {
                let (mut local, from) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        continue;
                    }
                };
                let target = target.clone();
                let device = device.clone();
                tokio::spawn(async move {
                    match broker::open(&target, &device, remote_port, transport).await {
                        Ok(mut remote) => {
                            info!(%from, port = remote_port, "forwarding");
                            let _ = tokio::io::copy_bidirectional(&mut local, &mut remote).await;
                            remote.close().await;
                        }
                        Err(e) => warn!(%from, port = remote_port, error = %e, "could not open the tunnel"),
                    }
                });
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert_eq!(
            "2222:22".parse::<ForwardSpec>().unwrap(),
            ForwardSpec {
                local: "127.0.0.1:2222".parse().unwrap(),
                remote_port: 22
            }
        );
        assert_eq!(
            "0.0.0.0:8080:80".parse::<ForwardSpec>().unwrap(),
            ForwardSpec {
                local: "0.0.0.0:8080".parse().unwrap(),
                remote_port: 80
            }
        );
        assert_eq!(
            "[::1]:8080:80".parse::<ForwardSpec>().unwrap(),
            ForwardSpec {
                local: "[::1]:8080".parse().unwrap(),
                remote_port: 80
            }
        );
        for bad in ["22", "a:22", "2222:0", "2222:x", "host:1:2", ""] {
            assert!(bad.parse::<ForwardSpec>().is_err(), "{bad}");
        }
    }
}
