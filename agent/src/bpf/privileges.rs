//! What the kernel needs from the agent's privileges, and what to say when
//! it refuses.
//!
//! The chart grants CAP_BPF and CAP_PERFMON (uid 0, everything else
//! dropped). Two kernel generations need more, and the agent tells which:
//! * before 5.8 there is no CAP_BPF/CAP_PERFMON: CAP_SYS_ADMIN (chart value
//!   `legacyKernelCapabilities`);
//! * before 5.11 BPF maps are charged to RLIMIT_MEMLOCK, not the memory
//!   cgroup (`bpf: memcg-based memory accounting`, 5.11): the agent raises
//!   the limit, which needs CAP_SYS_RESOURCE unless the runtime already set
//!   it high (chart value `memlockCapability`).

use std::io;

/// Linux capability numbers (`include/uapi/linux/capability.h`).
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYS_RESOURCE: u32 = 24;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// `major.minor` of the running kernel, from uname.
pub fn kernel_version() -> Option<(u32, u32)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut parts = release.trim().split(['.', '-']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// The effective capability set of this process, from /proc/self/status.
pub fn effective_capabilities() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
    u64::from_str_radix(hex, 16).ok()
}

fn has(caps: u64, cap: u32) -> bool {
    caps & (1 << cap) != 0
}

/// Kernels before 5.11 charge maps to RLIMIT_MEMLOCK.
fn charges_memlock(kernel: (u32, u32)) -> bool {
    kernel < (5, 11)
}

/// The memlock limit after [`raise_memlock`]; `None` when unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Memlock {
    pub soft_bytes: Option<u64>,
}

/// On kernels that charge BPF maps to RLIMIT_MEMLOCK, lifts the limit as
/// far as this process may (to unlimited with CAP_SYS_RESOURCE, else to the
/// hard limit). Returns the limit in force.
pub fn raise_memlock() -> Option<Memlock> {
    if !kernel_version().is_some_and(charges_memlock) {
        return None;
    }
    let mut current = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut current) } != 0 {
        return None;
    }
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    let to_hard = libc::rlimit { rlim_cur: current.rlim_max, rlim_max: current.rlim_max };
    // SAFETY: valid rlimit structs.
    let soft = if current.rlim_cur == libc::RLIM_INFINITY
        || unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } == 0
    {
        libc::RLIM_INFINITY
    } else if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &to_hard) } == 0 {
        current.rlim_max
    } else {
        current.rlim_cur
    };
    Some(Memlock { soft_bytes: (soft != libc::RLIM_INFINITY).then_some(soft) })
}

/// Why `perf_event_open` (the kprobe tap) was refused, when the node's
/// `kernel.perf_event_paranoid` explains it: Debian and Ubuntu add a level
/// 3 that refuses every perf_event_open without CAP_SYS_ADMIN, whatever
/// CAP_PERFMON says (their `perf_event_paranoid` patch).
pub fn perf_event_hint(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    if !has_errno(e, libc::EACCES) && !has_errno(e, libc::EPERM) {
        return None;
    }
    let paranoid: i32 = std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid").ok()?.trim().parse().ok()?;
    let caps = effective_capabilities().unwrap_or(0);
    (paranoid > 2 && !has(caps, CAP_SYS_ADMIN)).then(|| {
        format!(
            "kernel.perf_event_paranoid is {paranoid}: this distribution's extra level refuses perf_event_open without \
             CAP_SYS_ADMIN; set it to 2 on the node (sysctl kernel.perf_event_paranoid=2), or use the fentry tap, which \
             does not need it"
        )
    })
}

fn has_errno(e: &(dyn std::error::Error + 'static), errno: i32) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>()
            && io.raw_os_error() == Some(errno)
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Whether `e` or one of its causes is EPERM.
pub fn refused_for_permission(e: &(dyn std::error::Error + 'static)) -> bool {
    has_errno(e, libc::EPERM)
}

/// What to do about a load the kernel refused, given the kernel, this
/// process's capabilities and its memlock limit.
pub fn diagnose(
    permission_refused: bool,
    kernel: Option<(u32, u32)>,
    caps: Option<u64>,
    memlock: Option<Memlock>,
) -> String {
    if !permission_refused {
        return "the agent needs CAP_BPF and CAP_PERFMON (CAP_SYS_ADMIN before kernel 5.8)".to_string();
    }
    let kernel_text = kernel.map(|(a, b)| format!("{a}.{b}")).unwrap_or_else(|| "of unknown version".into());
    let caps = caps.unwrap_or(0);
    if kernel.is_some_and(|k| k < (5, 8)) {
        if !has(caps, CAP_SYS_ADMIN) {
            return format!(
                "kernel {kernel_text} predates CAP_BPF and CAP_PERFMON (5.8): the agent needs CAP_SYS_ADMIN and \
                 CAP_SYS_RESOURCE there (chart value legacyKernelCapabilities=true)"
            );
        }
    } else {
        let missing: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
            .into_iter()
            .filter(|(cap, _)| !has(caps, *cap))
            .map(|(_, name)| name)
            .collect();
        if !missing.is_empty() && !has(caps, CAP_SYS_ADMIN) {
            return format!("the agent lacks {} (the chart grants BPF and PERFMON)", missing.join(" and "));
        }
    }
    if let Some(Memlock { soft_bytes: Some(limit) }) = memlock
        && !has(caps, CAP_SYS_RESOURCE)
    {
        return format!(
            "kernel {kernel_text} charges BPF maps to RLIMIT_MEMLOCK (memory-cgroup accounting came in 5.11), the \
             limit is {} KiB and raising it needs CAP_SYS_RESOURCE, which the agent lacks: set the chart value \
             memlockCapability=true (adds SYS_RESOURCE), or raise the container runtime's memlock limit",
            limit / 1024
        );
    }
    format!(
        "kernel {kernel_text} refused although the agent holds the capabilities it needs: a seccomp profile or an LSM \
         (AppArmor, SELinux) is blocking bpf() (docs/operations.md, \"Seccomp\" and \"AppArmor and SELinux\")"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHART: u64 = (1 << CAP_BPF) | (1 << CAP_PERFMON);

    #[test]
    fn names_what_each_kernel_lacks() {
        let memlock = Some(Memlock { soft_bytes: Some(64 * 1024) });
        let said = diagnose(true, Some((5, 10)), Some(CHART), memlock);
        assert!(said.contains("CAP_SYS_RESOURCE") && said.contains("memlockCapability=true"), "{said}");
        let said = diagnose(true, Some((5, 10)), Some(CHART | (1 << CAP_SYS_RESOURCE)), memlock);
        assert!(said.contains("seccomp"), "{said}");
        let said = diagnose(true, Some((6, 1)), Some(1 << CAP_BPF), None);
        assert!(said.contains("lacks CAP_PERFMON"), "{said}");
        let said = diagnose(true, Some((5, 4)), Some(CHART), None);
        assert!(said.contains("CAP_SYS_ADMIN") && said.contains("legacyKernelCapabilities"), "{said}");
        let said = diagnose(true, Some((6, 12)), Some(CHART), None);
        assert!(said.contains("seccomp"), "{said}");
    }

    #[test]
    fn finds_eperm_in_a_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] io::Error);
        assert!(refused_for_permission(&Outer(io::Error::from_raw_os_error(libc::EPERM))));
        assert!(!refused_for_permission(&Outer(io::Error::from_raw_os_error(libc::ENOENT))));
    }

    #[test]
    fn reads_this_kernel() {
        let (major, _) = kernel_version().expect("a Linux kernel version");
        assert!(major >= 4);
    }
}
