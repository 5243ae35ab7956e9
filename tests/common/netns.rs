//! A network namespace joined to the host by a veth pair, for tests that need a real network
//! path they can break (`faults.rs`) or slow down (`conflation.rs`). Needs root and iproute2
//! (`ip`, `tc`); CI runs as root and `tests/run.sh` installs iproute2.

use std::process::{Child, Command, Stdio};

pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `ip {}`: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network namespace joined to the host by a veth pair (/30 addresses), with the process
/// running inside it; all of it is removed when dropped, panics included.
pub struct Netns {
    pub name: String,
    pub host_if: String,
    pub ns_if: String,
    pub host_ip: String,
    pub ns_ip: String,
    pub inside: Option<Child>,
}

impl Netns {
    pub fn create() -> Netns {
        // Several namespaces per process (tests run in parallel): a number for each.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 50;
        let pid = std::process::id();
        let id = pid & 0xfffff;
        let (a, b) = ((pid >> 6) & 0xff, (pid & 0x3f) << 2);
        let mut ns = Netns {
            name: format!("bts-test-{pid}-{n}"),
            host_if: format!("btf{id:05x}{n}h"),
            ns_if: format!("btf{id:05x}{n}p"),
            host_ip: format!("10.{}.{a}.{}", 200 + n, b + 1),
            ns_ip: format!("10.{}.{a}.{}", 200 + n, b + 2),
            inside: None,
        };
        let setup = || -> Result<(), String> {
            ip(&["netns", "add", &ns.name])?;
            ip(&[
                "link",
                "add",
                &ns.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &ns.ns_if,
            ])?;
            ip(&["link", "set", &ns.ns_if, "netns", &ns.name])?;
            ip(&[
                "addr",
                "add",
                &format!("{}/30", ns.host_ip),
                "dev",
                &ns.host_if,
            ])?;
            ip(&["link", "set", &ns.host_if, "up"])?;
            ip(&[
                "-n",
                &ns.name,
                "addr",
                "add",
                &format!("{}/30", ns.ns_ip),
                "dev",
                &ns.ns_if,
            ])?;
            ip(&["-n", &ns.name, "link", "set", &ns.ns_if, "up"])?;
            ip(&["-n", &ns.name, "link", "set", "lo", "up"])
        };
        if let Err(e) = setup() {
            let uid = Command::new("id")
                .arg("-u")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_default();
            ns.cleanup();
            panic!(
                "this test needs root (uid {uid}) and iproute2 to create a network namespace and \
                 a veth pair; CI runs as root and `bash tests/run.sh` installs iproute2: {e}"
            );
        }
        ns
    }

    /// Slows what the host sends into the namespace to `rate` (a `tc` rate: `64kbit`) with a
    /// token bucket filter on the host's end of the pair.
    pub fn shape_to_ns(&self, rate: &str) -> Result<(), String> {
        let out = Command::new("tc")
            .args([
                "qdisc",
                "add",
                "dev",
                &self.host_if,
                "root",
                "tbf",
                "rate",
                rate,
            ])
            .args(["burst", "4kb", "latency", "500ms"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run `tc`: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "`tc qdisc add dev {} root tbf rate {rate}` failed: {}",
                self.host_if,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    pub fn cleanup(&mut self) {
        if let Some(mut c) = self.inside.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Deleting one end of a veth pair deletes both.
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.cleanup();
    }
}
