//! Network namespaces joined to the host by a veth pair, each on its own /29 of
//! 10.201.0.0/16, with their own `/etc/hosts` when a test asks for one. Slots are claimed
//! with lock files so that tests running in parallel processes never collide; everything is
//! deleted on drop, also when the test panics, and leftovers of a killed run are removed
//! when their slot is claimed again.

use std::fs;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use crate::{output, run};

const LOCK_DIR: &str = "/run/floto-e2e";
const SLOTS: u32 = 8_192;

/// A claimed slot: an index that names the namespace, the interfaces and the subnet.
/// The nftables table of the firewall rules tests put in a namespace.
const FIREWALL: &str = "floto_e2e";

#[derive(Debug)]

struct Slot {
    n: u32,
    lock: PathBuf,
}

impl Slot {
    fn claim() -> Self {
        fs::create_dir_all(LOCK_DIR).expect("creating the e2e lock dir");
        // Start at a pid-dependent place so parallel processes rarely race for one slot.
        let start = std::process::id() % SLOTS;
        for i in 0..SLOTS {
            let n = (start + i) % SLOTS;
            let lock = PathBuf::from(LOCK_DIR).join(format!("slot-{n}"));
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&lock)
            {
                Ok(mut f) => {
                    let _ = write!(f, "{}", std::process::id());
                    cleanup_slot(n);
                    return Self { n, lock };
                }
                Err(_) => {
                    // Taken: reclaim it if its owner is gone.
                    let owner = fs::read_to_string(&lock).unwrap_or_default();
                    let alive = owner
                        .trim()
                        .parse::<u32>()
                        .is_ok_and(|pid| PathBuf::from(format!("/proc/{pid}")).exists());
                    if !alive && owner.trim().parse::<u32>().is_ok() {
                        let _ = fs::remove_file(&lock);
                    }
                }
            }
        }
        panic!("no free e2e network slot in {LOCK_DIR}");
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.lock);
    }
}

fn ns_name(n: u32) -> String {
    format!("fe2e-{n}")
}
fn host_if(n: u32) -> String {
    format!("fe{n}h")
}
fn dev_if(n: u32) -> String {
    format!("fe{n}d")
}

/// `ip netns exec` bind-mounts the files in `/etc/netns/NS/` over those in `/etc/`.
fn etc_dir(ns: &str) -> PathBuf {
    PathBuf::from("/etc/netns").join(ns)
}

/// Removes whatever a killed run may have left in this slot.
fn cleanup_slot(n: u32) {
    let ns = ns_name(n);
    kill_netns_processes(&ns);
    let _ = Command::new("ip")
        .args(["link", "del", &host_if(n)])
        .output();
    let _ = Command::new("ip").args(["netns", "del", &ns]).output();
    let _ = fs::remove_dir_all(etc_dir(&ns));
}

fn kill_netns_processes(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}

/// A network namespace with a veth link to the host.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
    /// Interface in the host namespace.
    pub host_if: String,
    /// Interface inside the namespace.
    pub dev_if: String,
    base: u32,
    current: std::sync::Mutex<Ipv4Addr>,
    _slot: Slot,
}

impl Netns {
    /// Creates the namespace, the veth pair and their addresses (host .1, namespace .2).
    pub fn new() -> Self {
        crate::require_root();
        crate::require(&["ip"]);
        let slot = Slot::claim();
        let n = slot.n;
        let base = u32::from(Ipv4Addr::new(10, 201, 0, 0)) + n * 8;
        let ns = Self {
            name: ns_name(n),
            host_if: host_if(n),
            dev_if: dev_if(n),
            base,
            current: std::sync::Mutex::new(Ipv4Addr::from(base + 2)),
            _slot: slot,
        };
        run(Command::new("ip").args(["netns", "add", &ns.name]));
        run(Command::new("ip").args([
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns.dev_if,
            "netns",
            &ns.name,
        ]));
        run(Command::new("ip").args([
            "addr",
            "add",
            &format!("{}/29", ns.host_ip()),
            "dev",
            &ns.host_if,
        ]));
        run(Command::new("ip").args(["link", "set", &ns.host_if, "up"]));
        ns.ip(&[
            "addr",
            "add",
            &format!("{}/29", ns.dev_ip()),
            "dev",
            &ns.dev_if,
        ]);
        ns.ip(&["link", "set", &ns.dev_if, "up"]);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// A WireGuard interface name unique to this slot. wireguard-go's control socket lives
    /// in the shared /var/run/wireguard, so names must differ across namespaces too.
    pub fn wg_iface(&self) -> String {
        format!("fw{}", self.slot_n())
    }

    fn slot_n(&self) -> u32 {
        self._slot.n
    }

    /// The host's address on the link (where servers in the host namespace are reached).
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base + 1)
    }

    /// The namespace's address on the link.
    pub fn dev_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base + 2)
    }

    /// `ip -n NS ARGS...`, panicking on failure.
    pub fn ip(&self, args: &[&str]) {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args));
    }

    /// Drops every UDP datagram on the namespace's link, both ways, as a network that blocks
    /// UDP does. The rules are on the link itself (netdev egress and ingress hooks): sends
    /// succeed and vanish (in the output hook they would fail at once with EPERM). They go
    /// with the namespace, or with [`Netns::unblock`].
    pub fn block_udp(&self) {
        self.nft(&format!(
            "table netdev {FIREWALL} {{\n\
               chain out {{\n\
                 type filter hook egress device \"{dev}\" priority 0;\n\
                 meta l4proto udp drop\n\
               }}\n\
               chain in {{\n\
                 type filter hook ingress device \"{dev}\" priority 0;\n\
                 meta l4proto udp drop\n\
               }}\n\
             }}\n",
            dev = self.dev_if
        ));
    }

    /// Lets nothing over the namespace's link but ARP and TCP with `proxy`.
    pub fn only_the_proxy(&self, proxy: std::net::SocketAddr) {
        self.nft(&format!(
            "table netdev {FIREWALL} {{\n\
               chain out {{\n\
                 type filter hook egress device \"{dev}\" priority 0;\n\
                 meta protocol arp accept\n\
                 ip daddr {ip} tcp dport {port} accept\n\
                 drop\n\
               }}\n\
               chain in {{\n\
                 type filter hook ingress device \"{dev}\" priority 0;\n\
                 meta protocol arp accept\n\
                 ip saddr {ip} tcp sport {port} accept\n\
                 drop\n\
               }}\n\
             }}\n",
            dev = self.dev_if,
            ip = proxy.ip(),
            port = proxy.port(),
        ));
    }

    /// Removes what [`Netns::block_udp`] or [`Netns::only_the_proxy`] set.
    pub fn unblock(&self) {
        run(self
            .command("nft")
            .args(["delete", "table", "netdev", FIREWALL]));
    }

    fn nft(&self, rules: &str) {
        crate::require(&["nft"]);
        let file = tempfile::NamedTempFile::new().expect("temp file");
        fs::write(file.path(), rules).expect("nft rules");
        run(self.command("nft").arg("-f").arg(file.path()));
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Moves the namespace's side of the link to another address of its /29, as a device
    /// whose address changes (roaming, DHCP, NAT rebinding). Returns the new address.
    pub fn roam(&self) -> Ipv4Addr {
        let current = self.current_dev_ip();
        let next = if current == self.dev_ip() {
            Ipv4Addr::from(self.base + 3)
        } else {
            self.dev_ip()
        };
        // Deleting an interface's primary address deletes its secondaries too, unless they
        // are promoted: without this the namespace would be left with no address at all.
        run(self.command("sysctl").args([
            "-q",
            "-w",
            &format!("net.ipv4.conf.{}.promote_secondaries=1", self.dev_if),
        ]));
        self.ip(&[
            "addr",
            "replace",
            &format!("{next}/29"),
            "dev",
            &self.dev_if,
        ]);
        self.ip(&["addr", "del", &format!("{current}/29"), "dev", &self.dev_if]);
        *self.current.lock().expect("lock") = next;
        next
    }

    /// The namespace's address on the link now (after any [`roam`](Self::roam)).
    pub fn current_dev_ip(&self) -> Ipv4Addr {
        *self.current.lock().expect("lock")
    }

    /// Sets the namespace's `/etc/hosts` (its DNS, for the commands [`command`](Self::command)
    /// starts after the first call): `localhost`, then one line per `(name, address)`, in
    /// order; a name listed twice resolves to both addresses. Later calls rewrite the file in
    /// place, so that processes already running see the change. Removed with the namespace.
    pub fn set_hosts(&self, entries: &[(&str, Ipv4Addr)]) {
        let dir = etc_dir(&self.name);
        fs::create_dir_all(&dir).expect("creating /etc/netns/NS");
        let mut text = String::from("127.0.0.1 localhost\n");
        for (name, ip) in entries {
            text.push_str(&format!("{ip} {name}\n"));
        }
        fs::write(dir.join("hosts"), text).expect("writing the namespace's hosts file");
    }
}

impl Default for Netns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        kill_netns_processes(&self.name);
        let _ = output(Command::new("ip").args(["link", "del", &self.host_if]));
        let _ = output(Command::new("ip").args(["netns", "del", &self.name]));
        let _ = fs::remove_dir_all(etc_dir(&self.name));
    }
}
