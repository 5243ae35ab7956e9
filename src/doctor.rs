//! `bts-guru doctor`: checks this host against a tuning profile (tuning/high-connections.conf or
//! tuning/sysctl-small.conf) and against what the daemon needs (io_uring allowed, locked memory
//! for the shards, open files, CPUs), and says what to change. It only reads.

use std::fmt;

/// How a finding reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Ok => "ok",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    pub what: String,
    pub have: String,
    pub want: String,
    /// What to do about it (empty when ok).
    pub fix: String,
}

/// The profiles shipped in tuning/, embedded so `doctor` works from anywhere.
pub const LARGE: &str = include_str!("../tuning/high-connections.conf");
pub const SMALL: &str = include_str!("../tuning/sysctl-small.conf");
/// Overlay for latency over CPU (busy polling, no autocorking).
pub const LOW_LATENCY: &str = include_str!("../tuning/low-latency.conf");

/// Keys where more is fine ("at least").
const AT_LEAST: &[&str] = &[
    "fs.file-max",
    "fs.nr_open",
    "net.core.somaxconn",
    "net.ipv4.tcp_max_syn_backlog",
    "net.core.netdev_max_backlog",
    "net.core.netdev_budget",
    "net.core.netdev_budget_usecs",
    "net.ipv4.tcp_max_tw_buckets",
    "net.core.rmem_max",
    "net.core.wmem_max",
    "net.netfilter.nf_conntrack_max",
];

/// `(key, value, optional)` lines of a sysctl.d file.
pub fn parse_profile(text: &str) -> Vec<(String, String, bool)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .filter_map(|l| {
            let (optional, l) = match l.strip_prefix('-') {
                Some(rest) => (true, rest),
                None => (false, l),
            };
            let (k, v) = l.split_once('=')?;
            Some((k.trim().to_owned(), normalize(v), optional))
        })
        .collect()
}

fn normalize(v: &str) -> String {
    v.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// What the host has, as read by the caller (so the logic tests without a host).
pub struct Host<'a> {
    /// A sysctl's value by dotted name, `None` when the kernel lacks it.
    pub sysctl: &'a dyn Fn(&str) -> Option<String>,
    pub nofile_soft: Option<u64>,
    pub nofile_hard: Option<u64>,
    /// RLIMIT_MEMLOCK in bytes; `None` for unlimited.
    pub memlock: Option<u64>,
    pub cap_ipc_lock: bool,
    pub cpus: usize,
}

pub fn check(profile: &str, host: &Host<'_>, shards: usize) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut add = |level, what: &str, have: String, want: String, fix: String| {
        out.push(Finding {
            level,
            what: what.to_owned(),
            have,
            want,
            fix,
        })
    };
    // What the daemon cannot run without.
    match (host.sysctl)("kernel.io_uring_disabled").as_deref().map(str::trim) {
        None | Some("0") => add(Level::Ok, "io_uring", "enabled".into(), "enabled".into(), String::new()),
        Some("1") => add(
            Level::Warn,
            "io_uring",
            "kernel.io_uring_disabled = 1".into(),
            "0".into(),
            "only members of kernel.io_uring_group may use io_uring: `sysctl -w kernel.io_uring_disabled=0` or add the daemon's user to that group".into(),
        ),
        Some(v) => add(
            Level::Fail,
            "io_uring",
            format!("kernel.io_uring_disabled = {v}"),
            "0".into(),
            "io_uring is off and the daemon cannot start: `sysctl -w kernel.io_uring_disabled=0`".into(),
        ),
    }
    let memlock_have = match host.memlock {
        None => "unlimited".to_owned(),
        Some(b) => format!("{} KiB", b >> 10),
    };
    match crate::plan_io_memory(shards, host.memlock, host.cap_ipc_lock) {
        Ok(per) => add(
            Level::Ok,
            "locked memory (RLIMIT_MEMLOCK)",
            if host.cap_ipc_lock {
                format!("{memlock_have} (CAP_IPC_LOCK: not enforced)")
            } else {
                memlock_have
            },
            format!(
                "{} KiB for {shards} shard(s) ({} KiB io_memory each, 3 rings)",
                (3 * shards as u64 * per as u64) >> 10,
                per >> 10
            ),
            String::new(),
        ),
        Err(e) => add(
            Level::Fail,
            "locked memory (RLIMIT_MEMLOCK)",
            memlock_have,
            format!(
                "at least {} KiB for {shards} shard(s)",
                3 * shards as u64 * (crate::IO_MEMORY as u64 >> 10)
            ),
            format!("{e}"),
        ),
    }
    let nofile = host.nofile_hard.unwrap_or(0);
    add(
        if nofile >= 65_536 {
            Level::Ok
        } else {
            Level::Warn
        },
        "open files (RLIMIT_NOFILE hard)",
        format!("{nofile} (soft {})", host.nofile_soft.unwrap_or(0)),
        "at least 65536: one per connection".into(),
        if nofile >= 65_536 {
            String::new()
        } else {
            "LimitNOFILE=1048576 in the systemd unit, or nofile in tuning/limits.conf".into()
        },
    );
    add(
        if shards <= host.cpus {
            Level::Ok
        } else {
            Level::Warn
        },
        "CPUs for the shards",
        format!("{} CPU(s)", host.cpus),
        format!("at least {shards} (one per shard)"),
        if shards <= host.cpus {
            String::new()
        } else {
            "run fewer shards (--shards) or give the process more CPUs".into()
        },
    );
    // The profile's knobs.
    for (key, want, optional) in parse_profile(profile) {
        let Some(have) = (host.sysctl)(&key).map(|v| normalize(&v)) else {
            if !optional {
                add(
                    Level::Warn,
                    &key,
                    "missing".into(),
                    want,
                    "this kernel lacks the key".into(),
                );
            }
            continue;
        };
        let fine = if AT_LEAST.contains(&key.as_str()) {
            match (have.parse::<u64>(), want.parse::<u64>()) {
                (Ok(h), Ok(w)) => h >= w,
                _ => have == want,
            }
        } else {
            have == want
        };
        let fix = if fine {
            String::new()
        } else {
            format!("sysctl -w {key}='{want}' (or tuning/apply.sh)")
        };
        add(
            if fine { Level::Ok } else { Level::Warn },
            &key,
            have,
            want,
            fix,
        );
    }
    out
}

/// The real host, read from /proc and rlimits.
pub fn read_sysctl(key: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/sys/{}", key.replace('.', "/")))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Prints the findings; returns the worst level.
pub fn report(findings: &[Finding], out: &mut dyn std::io::Write) -> Level {
    let _ = writeln!(out, "{:<5} {:<40} {:<36} wanted", "", "check", "this host");
    for f in findings {
        let _ = writeln!(
            out,
            "{:<5} {:<40} {:<36} {}",
            f.level.to_string(),
            f.what,
            f.have,
            f.want
        );
        if !f.fix.is_empty() {
            let _ = writeln!(out, "      -> {}", f.fix);
        }
    }
    let worst = findings.iter().map(|f| f.level).max().unwrap_or(Level::Ok);
    let warns = findings.iter().filter(|f| f.level == Level::Warn).count();
    let fails = findings.iter().filter(|f| f.level == Level::Fail).count();
    let _ = writeln!(
        out,
        "\n{} checks: {fails} failing, {warns} to tune",
        findings.len()
    );
    worst
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn host<'a>(
        sysctls: &'a HashMap<&'static str, &'static str>,
        memlock: Option<u64>,
    ) -> Host<'a> {
        Host {
            sysctl: Box::leak(Box::new(move |k: &str| {
                sysctls.get(k).map(|v| v.to_string())
            })),
            nofile_soft: Some(1024),
            nofile_hard: Some(20_000),
            memlock,
            cap_ipc_lock: false,
            cpus: 2,
        }
    }

    #[test]
    fn profiles_parse() {
        let p = parse_profile(LARGE);
        assert!(p
            .iter()
            .any(|(k, v, o)| k == "net.core.somaxconn" && v == "4096" && !o));
        assert!(p
            .iter()
            .any(|(k, _, o)| k == "kernel.io_uring_disabled" && *o));
        assert!(p
            .iter()
            .any(|(k, v, _)| k == "net.ipv4.tcp_rmem" && v == "4096 16384 4194304"));
        assert!(!parse_profile(SMALL).is_empty());
    }

    #[test]
    fn findings() {
        let mut s = HashMap::new();
        s.insert("net.core.somaxconn", "8192");
        s.insert("net.ipv4.tcp_tw_reuse", "2");
        s.insert("kernel.io_uring_disabled", "2");
        let profile = "net.core.somaxconn = 4096\nnet.ipv4.tcp_tw_reuse = 1\n-net.ipv4.tcp_migrate_req = 1\nnet.ipv4.tcp_fin_timeout = 15\n";
        let f = check(profile, &host(&s, Some(8 << 20)), 4);
        let by = |w: &str| f.iter().find(|x| x.what == w).unwrap().level;
        assert_eq!(by("io_uring"), Level::Fail);
        assert_eq!(by("locked memory (RLIMIT_MEMLOCK)"), Level::Ok);
        assert_eq!(by("open files (RLIMIT_NOFILE hard)"), Level::Warn);
        assert_eq!(by("CPUs for the shards"), Level::Warn);
        assert_eq!(
            by("net.core.somaxconn"),
            Level::Ok,
            "more than wanted is fine"
        );
        assert_eq!(by("net.ipv4.tcp_tw_reuse"), Level::Warn);
        assert_eq!(by("net.ipv4.tcp_fin_timeout"), Level::Warn, "missing key");
        assert!(
            f.iter().all(|x| x.what != "net.ipv4.tcp_migrate_req"),
            "optional and missing"
        );
        let f = check("", &host(&s, Some(256 << 10)), 3);
        assert_eq!(
            f.iter()
                .find(|x| x.what.starts_with("locked"))
                .unwrap()
                .level,
            Level::Fail
        );
        let mut out = Vec::new();
        assert_eq!(report(&f, &mut out), Level::Fail);
        assert!(String::from_utf8(out).unwrap().contains("failing"));
    }
}
