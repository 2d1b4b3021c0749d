//! The stack against the real Linux TCP stack: a network namespace with a TUN device
//! (10.250.0.1/24 on the kernel side), the netstack on 10.250.0.2 pumping packets to and from
//! the TUN file descriptor. Needs root and /dev/net/tun; fails loudly without them. All traffic
//! stays inside the namespace, which is deleted afterwards (also on failure).

mod common;

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::{echo_until_eof, pattern};
use floto_netstack::{Config, NetstackHandle};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const KERNEL: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
const NETSTACK: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 2);
const TUN_NAME: &str = "fnst0";
const LIMIT: Duration = Duration::from_secs(30);

/// Fails the test with an explanation when the machine cannot run it.
fn require_root_tun_and_ip() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .unwrap_or("?");
    assert!(
        euid == "0",
        "THIS TEST NEEDS ROOT (effective uid is {euid}): it creates a network namespace and a \
         TUN device to test against the Linux kernel's TCP stack"
    );
    assert!(
        std::path::Path::new("/dev/net/tun").exists(),
        "THIS TEST NEEDS /dev/net/tun (missing): it tests against the Linux kernel's TCP stack \
         through a TUN device"
    );
    assert!(
        Command::new("ip").arg("-V").output().is_ok(),
        "THIS TEST NEEDS the `ip` command (iproute2) to create a network namespace"
    );
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("running `ip`");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn create() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "fnst-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// Runs `f` on a fresh thread that has entered this namespace: sockets and devices it
    /// creates belong to the namespace (and may be used from any thread afterwards).
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
            // SAFETY: setns only reads the descriptor, which stays open for the call, and only
            // changes this thread's network namespace; the thread is ours and ends after `f`.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Creates a TUN device (no packet-info header) in the calling thread's namespace.
fn open_tun(name: &str) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")?;
    // struct ifreq: 16 bytes of name, then a union whose first member is `short ifr_flags`.
    let mut ifreq = [0u8; 40];
    ifreq[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    ifreq[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes one struct ifreq (40 bytes on Linux); `ifreq` is that
    // large, properly initialised, and outlives the call; the descriptor is open.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, ifreq.as_mut_ptr()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

/// A namespace with the TUN up and a netstack attached to it.
struct Setup {
    handle: NetstackHandle,
    stop: CancellationToken,
    ns: Netns,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn setup() -> Setup {
    require_root_tun_and_ip();
    let ns = Netns::create();
    let tun = ns
        .run(|| open_tun(TUN_NAME))
        .join()
        .expect("tun thread")
        .expect("creating the TUN device");
    ip(&[
        "-n",
        &ns.name,
        "addr",
        "add",
        "10.250.0.1/24",
        "dev",
        TUN_NAME,
    ]);
    ip(&["-n", &ns.name, "link", "set", TUN_NAME, "mtu", "1420", "up"]);

    let stop = CancellationToken::new();
    let (to_stack, inbound) = mpsc::channel::<Vec<u8>>(1024);
    let writer = tun.try_clone().expect("dup of the TUN fd");
    let sink = move |packet: &[u8]| {
        // Non-blocking: a full TUN queue drops the packet, like a NIC.
        let _ = (&writer).write(packet);
    };
    let (handle, driver) = floto_netstack::new(Config::new(NETSTACK, 24), inbound, sink);
    tokio::spawn(driver.run(stop.clone()));
    // SAFETY: the `File` owns its descriptor and is moved into the `AsyncFd`, so the descriptor
    // stays open and the same for the `AsyncFd`'s whole life.
    let reader = unsafe { AsyncFd::register(tun) }
        .map_err(|e| e.to_string())
        .expect("registering the TUN fd");
    let stop_reader = stop.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            let mut guard = tokio::select! {
                () = stop_reader.cancelled() => return,
                guard = reader.readable() => guard.expect("TUN readiness"),
            };
            match guard.try_io(|fd| fd.get_ref().read(&mut buf)) {
                Ok(Ok(n)) => {
                    if to_stack.send(buf[..n].to_vec()).await.is_err() {
                        return;
                    }
                }
                Ok(Err(e)) => panic!("reading the TUN device: {e}"),
                Err(_would_block) => continue,
            }
        }
    });
    Setup { handle, stop, ns }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netstack_dials_a_kernel_listener() {
    let setup = setup().await;
    let data = pattern(11, 2_000_000);

    // The kernel side: a listener inside the namespace that echoes one connection.
    let listener = setup
        .ns
        .run(|| std::net::TcpListener::bind((KERNEL, 0)))
        .join()
        .unwrap()
        .expect("binding in the namespace");
    let port = listener.local_addr().unwrap().port();
    let kernel = std::thread::spawn(move || {
        let (mut stream, peer) = listener.accept().expect("kernel accept");
        stream.set_read_timeout(Some(LIMIT)).unwrap();
        let mut got = Vec::new();
        stream.read_to_end(&mut got).expect("kernel read");
        stream.write_all(&got).expect("kernel write");
        stream.shutdown(Shutdown::Write).unwrap();
        (peer, got.len())
    });

    let mut stream = timeout(
        LIMIT,
        setup
            .handle
            .connect(SocketAddrV4::new(KERNEL, port), Duration::from_secs(5)),
    )
    .await
    .unwrap()
    .expect("netstack connect to the kernel");
    let start = std::time::Instant::now();
    stream.write_all(&data).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    timeout(LIMIT, stream.read_to_end(&mut echoed))
        .await
        .expect("echo from the kernel in time")
        .unwrap();
    let elapsed = start.elapsed();
    assert!(echoed == data, "kernel echo differs");
    let (peer, len) = tokio::task::spawn_blocking(move || kernel.join().unwrap())
        .await
        .unwrap();
    assert_eq!(peer, std::net::SocketAddr::V4(stream.local_addr()));
    assert_eq!(len, data.len());
    println!(
        "netstack -> kernel: 2 MB echoed in {elapsed:?} ({:.1} MB/s each way)",
        data.len() as f64 / elapsed.as_secs_f64() / 1e6
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_dials_a_netstack_listener() {
    let setup = setup().await;
    let mut listener = setup.handle.listen(2222).await.unwrap();
    let server = tokio::spawn(async move {
        let (stream, peer) = listener.accept().await.unwrap();
        let n = echo_until_eof(stream).await.unwrap();
        (peer, n)
    });

    let data = pattern(12, 2_000_000);
    let sent = data.clone();
    let kernel = setup.ns.run(move || {
        let mut stream = std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from((NETSTACK, 2222)),
            Duration::from_secs(5),
        )
        .expect("kernel connect to the netstack");
        stream.set_read_timeout(Some(LIMIT)).unwrap();
        let local = stream.local_addr().unwrap();
        let start = std::time::Instant::now();
        stream.write_all(&sent).expect("kernel write");
        stream.shutdown(Shutdown::Write).unwrap();
        let mut echoed = Vec::new();
        stream.read_to_end(&mut echoed).expect("kernel read");
        (local, echoed, start.elapsed())
    });
    let (local, echoed, elapsed) = timeout(
        LIMIT,
        tokio::task::spawn_blocking(move || kernel.join().unwrap()),
    )
    .await
    .expect("kernel client finished in time")
    .unwrap();
    assert!(echoed == data, "netstack echo differs");
    let (peer, n) = timeout(LIMIT, server).await.unwrap().unwrap();
    assert_eq!(std::net::SocketAddr::V4(peer), local);
    assert_eq!(n, data.len());
    let stats = setup.handle.stats();
    assert_eq!(stats.accepted, 1, "{stats:?}");
    println!(
        "kernel -> netstack: 2 MB echoed in {elapsed:?} ({:.1} MB/s each way); stats {stats:?}",
        data.len() as f64 / elapsed.as_secs_f64() / 1e6
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_refuses_and_netstack_reports_it() {
    let setup = setup().await;
    // Nothing listens on this port in the namespace: the kernel answers with RST.
    let err = timeout(
        LIMIT,
        setup
            .handle
            .connect(SocketAddrV4::new(KERNEL, 1), Duration::from_secs(5)),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert!(
        matches!(err, floto_netstack::ConnectError::Refused),
        "{err:?}"
    );
}
