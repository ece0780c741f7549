//! One Cilium notification in, counter increments out.
//!
//! [`account`] is the whole in-kernel pipeline after the hook: it decides
//! whether the bytes are a policy verdict or a policy drop in a layout some
//! Cilium release has emitted, and adds them to the endpoint totals and the
//! flow table. Anything else ends as exactly one [`Stat`] outcome, never as
//! a flow. Every program (fentry, kprobe, replay) calls it the same way.
//!
//! Counters are per-CPU and updated without atomics: the tap runs in the
//! context of the tc program that emitted the notification, with bottom
//! halves disabled, so nothing else on this CPU touches the same slot.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use verdict_common::{
    cilium::{capture_hdr, direction, drop_notify, drop_reason, notify_type, policy_verdict},
    maps::{
        EndpointCounters, FLOW_FLAG_IPV6, FlowCounters, FlowKey, MAX_ENDPOINTS, MAX_NOTIFICATION_SIZE, Stat,
        VerdictClass,
    },
};

use crate::maps::{ENDPOINT_COUNTERS, FLOWS, STATS};

/// `BPF_NOEXIST`: create the flow only if no other CPU just did.
const BPF_NOEXIST: u64 = 1;
const EEXIST: i32 = 17;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
/// Reserved identity `host`.
const HOST_IDENTITY: u32 = 1;

/// The bytes of one notification, copied out of the emitter's stack.
pub type Notification = [u8; MAX_NOTIFICATION_SIZE];

/// Adds one to the outcome counter `stat`.
#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(slot) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: a per-CPU slot of this CPU, see the module comment.
        unsafe { *slot += 1 };
    }
}

/// Accounts one notification of `len` bytes (the helper's `meta_size`);
/// `buf` holds its first `min(len, MAX_NOTIFICATION_SIZE)` bytes.
#[inline(always)]
pub fn account(buf: &Notification, len: usize) {
    let outcome = match classify(buf, len) {
        Ok(decision) => {
            record(&decision);
            Stat::Counted
        }
        Err(stat) => stat,
    };
    count(outcome);
}

/// What one notification means for the counters.
struct Decision {
    key: FlowKey,
    /// `len_orig` of the notified packet.
    bytes: u64,
}

#[inline(always)]
fn u16_at(buf: &Notification, off: usize) -> u16 {
    u16::from_ne_bytes([buf[off], buf[off + 1]])
}

#[inline(always)]
fn u32_at(buf: &Notification, off: usize) -> u32 {
    u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]])
}

#[inline(always)]
fn classify(buf: &Notification, len: usize) -> Result<Decision, Stat> {
    if len < capture_hdr::SIZE {
        return Err(Stat::MalformedTruncated);
    }
    match buf[capture_hdr::TYPE] {
        notify_type::POLICY_VERDICT => classify_policy_verdict(buf, len),
        notify_type::DROP => classify_drop(buf, len),
        _ => Err(Stat::Filtered),
    }
}

/// `struct policy_verdict_notify`: 32 bytes with a u16 version up to v1.18,
/// 40 bytes (or more, with a downstream extension) with a u8 version and an
/// `ext_version` byte from v1.19. Version 1 in every release.
#[inline(always)]
fn classify_policy_verdict(buf: &Notification, len: usize) -> Result<Decision, Stat> {
    if len < policy_verdict::SIZE_V1 {
        return Err(Stat::MalformedTruncated);
    }
    let version_ok = if len == policy_verdict::SIZE_V1 {
        u16_at(buf, capture_hdr::VERSION) == policy_verdict::VERSION as u16
    } else if len >= policy_verdict::SIZE_V2 {
        buf[capture_hdr::VERSION] == policy_verdict::VERSION
    } else {
        false
    };
    if !version_ok {
        return Err(Stat::MalformedVersion);
    }

    let flags = buf[policy_verdict::FLAGS];
    let dir = flags & policy_verdict::FLAG_DIR_MASK;
    if dir != direction::INGRESS && dir != direction::EGRESS {
        return Err(Stat::MalformedField);
    }
    let verdict = u32_at(buf, policy_verdict::VERDICT) as i32;
    // Cilium's monitor tests `audited` before the sign (GetPolicyActionString).
    let class = if flags & policy_verdict::FLAG_AUDITED != 0 {
        VerdictClass::Audited
    } else if verdict < 0 {
        VerdictClass::Denied
    } else if verdict > 0 {
        VerdictClass::Redirected
    } else {
        VerdictClass::Allowed
    };
    let reason = if verdict < 0 && verdict >= -255 { (-verdict) as u8 } else { 0 };

    // For ICMP echo Cilium's `dst_port` is the echo identifier
    // (`ct_extract_ports4`): one flow per ping would fill the table.
    let proto = buf[policy_verdict::PROTO];
    let dst_port =
        if proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6 { 0 } else { u16_at(buf, policy_verdict::DST_PORT) };

    Ok(Decision {
        key: FlowKey {
            endpoint_id: u16_at(buf, capture_hdr::SOURCE),
            dst_port,
            remote_identity: u32_at(buf, policy_verdict::REMOTE_LABEL),
            proto,
            direction: dir,
            class: class as u8,
            match_type: (flags & policy_verdict::FLAG_MATCH_TYPE_MASK) >> policy_verdict::FLAG_MATCH_TYPE_SHIFT,
            notify_type: notify_type::POLICY_VERDICT,
            reason,
            flags: if flags & policy_verdict::FLAG_IPV6 != 0 { FLOW_FLAG_IPV6 } else { 0 },
            _pad: 0,
        },
        bytes: u32_at(buf, capture_hdr::LEN_ORIG) as u64,
    })
}

/// `struct drop_notify` when its reason is a policy decision. Sizes and
/// versions: 32/v1 (v1.12), 36/v1 (v1.13–v1.17.3), 40/v2 (v1.17.4–v1.18),
/// 48+/v3 with a u8 version (v1.19+).
#[inline(always)]
fn classify_drop(buf: &Notification, len: usize) -> Result<Decision, Stat> {
    let reason = buf[capture_hdr::SUBTYPE];
    if !drop_reason::is_policy(reason) {
        return Err(Stat::Filtered);
    }
    if len < drop_notify::SIZE_V1_12 {
        return Err(Stat::MalformedTruncated);
    }
    let version16 = u16_at(buf, capture_hdr::VERSION);
    let version_ok = if len == drop_notify::SIZE_V1_12 || len == drop_notify::SIZE_V1_13 {
        version16 == 1
    } else if len == drop_notify::SIZE_V1_17 {
        version16 == 2
    } else if len >= drop_notify::SIZE_V1_19 {
        buf[capture_hdr::VERSION] == 3
    } else {
        false
    };
    if !version_ok {
        return Err(Stat::MalformedVersion);
    }

    // A drop carries no direction; the call sites tell it apart:
    // * bpf_lxc passes the endpoint's ID as `dst_id` on ingress (remote =
    //   source) and 0 on egress (remote = destination);
    // * the host firewall (`send_drop_notify_error*`) passes dst_label = 0
    //   and dst_id = 0: the source is the host (1, or 0 in v1.14's
    //   `cil_to_netdev`) on egress, the remote peer on ingress.
    // Before Cilium 1.16 these drops are the host firewall's only report.
    let src_label = u32_at(buf, drop_notify::SRC_LABEL);
    let dst_label = u32_at(buf, drop_notify::DST_LABEL);
    let (dir, remote) = if u32_at(buf, drop_notify::DST_ID) != 0 {
        (direction::INGRESS, src_label)
    } else if dst_label != 0 || src_label == 0 || src_label == HOST_IDENTITY {
        (direction::EGRESS, dst_label)
    } else {
        (direction::INGRESS, src_label)
    };
    let ipv6 = len >= drop_notify::SIZE_V1_17 && buf[drop_notify::FLAGS] & 0x01 != 0;

    Ok(Decision {
        key: FlowKey {
            endpoint_id: u16_at(buf, capture_hdr::SOURCE),
            dst_port: 0,
            remote_identity: remote,
            proto: 0,
            direction: dir,
            class: VerdictClass::Denied as u8,
            match_type: 0,
            notify_type: notify_type::DROP,
            reason,
            flags: if ipv6 { FLOW_FLAG_IPV6 } else { 0 },
            _pad: 0,
        },
        bytes: u32_at(buf, capture_hdr::LEN_ORIG) as u64,
    })
}

#[inline(always)]
fn record(decision: &Decision) {
    // SAFETY: plain helper call, no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let key = &decision.key;

    let endpoint = key.endpoint_id as u32;
    if endpoint < MAX_ENDPOINTS {
        if let Some(totals) = ENDPOINT_COUNTERS.get_ptr_mut(endpoint) {
            // SAFETY: this CPU's slot, see the module comment.
            let totals: &mut EndpointCounters = unsafe { &mut *totals };
            let slot = if key.direction == direction::INGRESS { 0 } else { 1 };
            if key.notify_type == notify_type::DROP {
                totals.policy_drops[slot] += 1;
            } else {
                totals.verdicts[slot][(key.class & 3) as usize] += 1;
            }
            if totals.first_seen_ns == 0 {
                totals.first_seen_ns = now;
            }
            totals.last_seen_ns = now;
        }
    } else {
        count(Stat::EndpointOutOfRange);
    }

    if let Some(flow) = FLOWS.get_ptr_mut(key) {
        // SAFETY: this CPU's value of a live entry.
        add(unsafe { &mut *flow }, decision.bytes, now);
        return;
    }
    let fresh = FlowCounters { notifications: 1, bytes: decision.bytes, first_seen_ns: now, last_seen_ns: now };
    match FLOWS.insert(key, &fresh, BPF_NOEXIST) {
        Ok(()) => count(Stat::FlowsCreated),
        // Another CPU created it between our lookup and insert.
        Err(e) if e == -EEXIST => match FLOWS.get_ptr_mut(key) {
            // SAFETY: as above.
            Some(flow) => add(unsafe { &mut *flow }, decision.bytes, now),
            None => count(Stat::FlowUpdateFailed),
        },
        Err(_) => count(Stat::FlowUpdateFailed),
    }
}

#[inline(always)]
fn add(flow: &mut FlowCounters, bytes: u64, now: u64) {
    flow.notifications += 1;
    flow.bytes += bytes;
    if flow.first_seen_ns == 0 {
        flow.first_seen_ns = now;
    }
    flow.last_seen_ns = now;
}
