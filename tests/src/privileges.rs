//! Running a child with exactly a pod's privileges, as a container runtime
//! does for `runAsUser: 0`, `capabilities: {drop: [ALL], add: [...]}`,
//! `allowPrivilegeEscalation: false`: the bounding, permitted and effective
//! sets hold exactly the added capabilities, inheritable and ambient are
//! empty, and no_new_privs is set. A uid-0 process that execs keeps exactly
//! its bounding set (root's file capabilities are all set), so that is the
//! set the agent runs with; [`capabilities_of`] checks it afterwards.

use std::{io, os::unix::process::CommandExt as _, process::Command};

use anyhow::{Context as _, bail};

/// Linux capability names (without `CAP_`) by number,
/// `include/uapi/linux/capability.h`.
const NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// A pod's privileges: uid and the capabilities added after `drop: [ALL]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPrivileges {
    pub uid: u32,
    /// Capability bit mask.
    pub capabilities: u64,
    /// RLIMIT_MEMLOCK (soft and hard) the child starts with; None keeps
    /// this process's. A pod inherits its runtime's, which may be as low
    /// as the kernel's default.
    pub memlock_bytes: Option<u64>,
}

/// The kernel's own RLIMIT_MEMLOCK for init before 5.16 (`MLOCK_LIMIT`,
/// 64 KiB): what a runtime that does not raise it passes on.
pub const KERNEL_DEFAULT_MEMLOCK: u64 = 64 * 1024;

impl PodPrivileges {
    /// From a comma-separated list as Kubernetes spells it (`BPF,PERFMON`;
    /// a `CAP_` prefix is accepted too).
    pub fn parse(uid: u32, list: &str) -> anyhow::Result<PodPrivileges> {
        let mut capabilities = 0u64;
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let bare = name.strip_prefix("CAP_").unwrap_or(name).to_ascii_uppercase();
            let bit = NAMES.iter().position(|n| *n == bare).with_context(|| format!("unknown capability {name:?}"))?;
            capabilities |= 1 << bit;
        }
        Ok(PodPrivileges { uid, capabilities, memlock_bytes: None })
    }

    /// The capabilities as Kubernetes spells them, e.g. `BPF,PERFMON`.
    pub fn names(&self) -> String {
        names(self.capabilities)
    }

    /// Makes `command` exec with exactly these privileges.
    pub fn apply(&self, command: &mut Command) -> anyhow::Result<()> {
        if self.uid != 0 {
            bail!("only uid 0 is supported (the chart runs the agent as uid 0), not {}", self.uid);
        }
        let last_cap: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .context("reading /proc/sys/kernel/cap_last_cap")?
            .trim()
            .parse()
            .context("parsing /proc/sys/kernel/cap_last_cap")?;
        let keep = self.capabilities;
        let memlock = self.memlock_bytes;
        // SAFETY: the closure only makes raw syscalls (no allocation, no
        // locks), which is what may run between fork and exec.
        unsafe {
            command.pre_exec(move || {
                if let Some(bytes) = memlock {
                    let limit = libc::rlimit { rlim_cur: bytes, rlim_max: bytes };
                    check(libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) as libc::c_long)?;
                }
                restrict(keep, last_cap)
            });
        }
        Ok(())
    }
}

/// `struct __user_cap_header_struct` / `__user_cap_data_struct`, v3.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

fn check(rc: libc::c_long) -> io::Result<()> {
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

fn restrict(keep: u64, last_cap: u32) -> io::Result<()> {
    for cap in 0..=last_cap {
        if keep & (1 << cap) == 0 {
            // SAFETY: prctl with integer arguments.
            check(unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } as libc::c_long)?;
        }
    }
    // Ambient capabilities exist since 4.3; EINVAL before that means none.
    // SAFETY: prctl with integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, 0, 0, 0) };
    if rc < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
        return Err(io::Error::last_os_error());
    }
    let mut header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let low = keep as u32;
    let high = (keep >> 32) as u32;
    let data = [
        CapData { effective: low, permitted: low, inheritable: 0 },
        CapData { effective: high, permitted: high, inheritable: 0 },
    ];
    // SAFETY: header and two data structs as capset(2) v3 wants.
    check(unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut CapHeader, data.as_ptr()) })?;
    // allowPrivilegeEscalation: false.
    // SAFETY: prctl with integer arguments.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } as libc::c_long)
}

/// The effective and bounding sets of a running process.
pub fn capabilities_of(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let hex = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .with_context(|| format!("/proc/{pid}/status has no {name}"))?;
        Ok(u64::from_str_radix(hex.trim(), 16)?)
    };
    Ok((field("CapEff:")?, field("CapBnd:")?))
}

/// A capability mask as Kubernetes spells the names.
pub fn names(mask: u64) -> String {
    (0..64)
        .filter(|b| mask & (1 << b) != 0)
        .map(|b| NAMES.get(b).map(|n| n.to_string()).unwrap_or_else(|| format!("CAP_{b}")))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let p = PodPrivileges::parse(0, "BPF, PERFMON,CAP_SYS_RESOURCE").unwrap();
        assert_eq!(p.capabilities, (1 << 39) | (1 << 38) | (1 << 24));
        assert_eq!(p.names(), "SYS_RESOURCE,PERFMON,BPF");
        assert!(PodPrivileges::parse(0, "BPF,NOPE").is_err());
    }

    /// A child started with the chart's set has exactly it, and no more.
    #[test]
    fn a_child_gets_exactly_the_set() {
        let p = PodPrivileges::parse(0, "BPF,PERFMON").unwrap();
        let mut c = Command::new("sleep");
        c.arg("5");
        p.apply(&mut c).unwrap();
        let mut child = c.spawn().expect("spawning sleep as root with the chart's capabilities");
        std::thread::sleep(std::time::Duration::from_millis(200));
        let (eff, bnd) = capabilities_of(child.id()).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!((names(eff), names(bnd)), ("PERFMON,BPF".to_string(), "PERFMON,BPF".to_string()));
    }
}
