//! Decoders for the notifications Cilium's datapath writes into
//! `cilium_events`, in the manner of Cilium's `pkg/monitor`: one decoder per
//! message type, named after its C struct, fields in C order; printing
//! lives apart in [`format`].
//!
//! Which layout, which direction, which class and which flow key is decided
//! once, by the shared classifier `verdict_common::classify` that the
//! kernel's `account()` runs too; the decoders call it and add names and
//! the fields the classifier does not need. So they accept exactly what the
//! kernel accepts, and reject with the same outcome:
//! a size shorter than the type's smallest layout is [`DecodeError::Truncated`],
//! a size/version pair no release has emitted is [`DecodeError::UnknownVersion`],
//! a direction other than ingress/egress is [`DecodeError::BadField`].
//! [`expected_flow_key`] states that agreement as a function, so a test can
//! replay any byte string through the kernel program and compare.
//!
//! Sizes are the helper's `meta_size`, i.e. the length of the slice handed
//! in: the perf record's own length is padded and says nothing about which
//! layout was sent (Linux pads raw samples, `kernel/events/core.c`).
//! Multi-byte fields are host byte order, and the flag bitfields are read as
//! clang lays them out on little-endian targets, which is where Cilium runs.

pub mod api;
pub mod capture_hdr;
pub mod drop_notify;
pub mod format;
pub mod policy_verdict;

pub use capture_hdr::NotifyCaptureHdr;
pub use drop_notify::{DropLayout, DropNotify};
pub use policy_verdict::{PolicyVerdictLayout, PolicyVerdictNotify};

use verdict_common::{
    cilium::notify_type,
    classify::{self, Reject},
    maps::{FlowKey, Stat},
};

/// Why a notification could not be decoded. Each variant is one of the
/// in-kernel classifier's `Malformed*` outcomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// `Stat::MalformedTruncated`.
    #[error("{what} of {got} bytes is shorter than its smallest layout ({need} bytes)")]
    Truncated { what: &'static str, need: usize, got: usize },
    /// `Stat::MalformedVersion`. `version` is the u16 at offset 14 for the
    /// 32/36/40-byte layouts and the u8 there for the v1.19+ ones.
    #[error("{what} of {size} bytes with version {version} matches no Cilium release")]
    UnknownVersion { what: &'static str, size: usize, version: u16 },
    /// `Stat::MalformedField`.
    #[error("{what}: {field} = {value} is not a value Cilium emits")]
    BadField { what: &'static str, field: &'static str, value: u32 },
    /// The shared classifier rejected bytes the decoder accepts: a bug in
    /// this crate, reported rather than hidden.
    #[error("the classifier rejects this notification ({reject:?}) but the decoder accepts it; please report it")]
    Disagreement { reject: Reject },
}

/// [`DecodeError`] without its details: what a golden vector expects and
/// what the kernel counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DecodeErrorKind {
    Truncated,
    UnknownVersion,
    BadField,
}

impl DecodeError {
    pub fn kind(&self) -> DecodeErrorKind {
        match self {
            DecodeError::Truncated { .. } => DecodeErrorKind::Truncated,
            DecodeError::UnknownVersion { .. } => DecodeErrorKind::UnknownVersion,
            DecodeError::BadField { .. } => DecodeErrorKind::BadField,
            DecodeError::Disagreement { reject } => match reject {
                Reject::Truncated => DecodeErrorKind::Truncated,
                Reject::UnknownVersion => DecodeErrorKind::UnknownVersion,
                Reject::BadField | Reject::Filtered => DecodeErrorKind::BadField,
            },
        }
    }
}

impl DecodeErrorKind {
    /// The shared classifier's outcome for this kind.
    pub fn reject(self) -> Reject {
        match self {
            DecodeErrorKind::Truncated => Reject::Truncated,
            DecodeErrorKind::UnknownVersion => Reject::UnknownVersion,
            DecodeErrorKind::BadField => Reject::BadField,
        }
    }

    /// The `STATS` slot the in-kernel classifier bumps for this outcome.
    pub fn stat(self) -> Stat {
        self.reject().stat()
    }
}

/// One decoded datapath notification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notification {
    /// `CILIUM_NOTIFY_POLICY_VERDICT` (5).
    PolicyVerdict(PolicyVerdictNotify),
    /// `CILIUM_NOTIFY_DROP` (1), any reason.
    Drop(DropNotify),
    /// Any other type (trace, debug, capture, trace-sock, or a value no
    /// release defines); only its 16-byte header was checked.
    Other { notify_type: u8 },
}

/// Decodes one notification; `bytes` is exactly what the datapath passed as
/// `meta` (`meta_size` bytes), without the captured packet.
pub fn decode(bytes: &[u8]) -> Result<Notification, DecodeError> {
    let hdr = NotifyCaptureHdr::decode(bytes)?;
    match hdr.notify_type {
        notify_type::POLICY_VERDICT => PolicyVerdictNotify::decode(bytes).map(Notification::PolicyVerdict),
        notify_type::DROP => DropNotify::decode(bytes).map(Notification::Drop),
        other => Ok(Notification::Other { notify_type: other }),
    }
}

pub use verdict_common::classify::Accounted;

/// The flow key `account.rs` creates for these bytes: `Ok(None)` where it
/// counts `Filtered` (not a policy verdict, or a drop whose reason is not a
/// policy reason), `Err` where it counts a `Malformed*` outcome.
pub fn expected_flow_key(bytes: &[u8]) -> Result<Option<FlowKey>, DecodeError> {
    expected_accounting(bytes).map(|a| a.map(|a| a.key))
}

/// [`expected_flow_key`] plus the byte count: the shared classifier
/// (`verdict_common::classify`) run on the bytes exactly as the tap copies
/// them, with the decoders' detailed error where it rejects them.
pub fn expected_accounting(bytes: &[u8]) -> Result<Option<Accounted>, DecodeError> {
    match classify::classify_slice(bytes) {
        Ok(accounted) => Ok(Some(accounted)),
        Err(Reject::Filtered) => Ok(None),
        // The classifier said no; the decoder says why, in words.
        Err(reject) => match decode(bytes) {
            Err(e) if e.kind().reject() == reject => Err(e),
            _ => Err(DecodeError::Disagreement { reject }),
        },
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use verdict_common::{cilium::drop_reason, maps::MAX_NOTIFICATION_SIZE};

    use super::*;
    use crate::cilium::golden::golden_notifications;

    /// `decode` and `expected_flow_key` must tell the same story.
    fn agree(bytes: &[u8]) -> Result<(), TestCaseError> {
        let decoded = decode(bytes);
        let expected = expected_accounting(bytes);
        match (&decoded, &expected) {
            (Ok(Notification::PolicyVerdict(n)), Ok(Some(a))) => {
                prop_assert_eq!(a.key, n.flow_key());
                prop_assert_eq!(a.bytes, u64::from(n.hdr.len_orig));
            }
            (Ok(Notification::Drop(d)), Ok(Some(a))) => {
                prop_assert!(d.is_policy());
                prop_assert_eq!(a.key, d.flow_key());
            }
            (Ok(Notification::Drop(d)), Ok(None)) => prop_assert!(!d.is_policy()),
            (Ok(Notification::Other { notify_type }), Ok(None)) => {
                prop_assert!(*notify_type != notify_type::POLICY_VERDICT && *notify_type != notify_type::DROP)
            }
            // A malformed drop with a non-policy reason: the kernel filters it
            // before validating, the decoder still reports the defect.
            (Err(_), Ok(None)) => {
                prop_assert_eq!(bytes.first().copied(), Some(notify_type::DROP));
                prop_assert!(!drop_reason::is_policy(bytes.get(1).copied().unwrap_or(0)));
            }
            (Err(a), Err(b)) => prop_assert_eq!(a, b),
            _ => prop_assert!(false, "decode {:?} vs expected {:?}", decoded, expected),
        }
        // Only the first MAX_NOTIFICATION_SIZE bytes reach the classifier.
        if bytes.len() > MAX_NOTIFICATION_SIZE {
            let mut tail_changed = bytes.to_vec();
            for b in &mut tail_changed[MAX_NOTIFICATION_SIZE..] {
                *b ^= 0xA5;
            }
            prop_assert_eq!(expected_accounting(&tail_changed), expected);
        }
        Ok(())
    }

    fn golden_bytes() -> Vec<Vec<u8>> {
        golden_notifications().into_iter().map(|g| g.bytes).collect()
    }

    /// A golden vector with up to 4 byte edits and an optional resize, so the
    /// search stays near layouts the decoder accepts.
    fn mutated_golden() -> impl Strategy<Value = Vec<u8>> {
        let n = golden_bytes().len();
        (
            0..n,
            proptest::collection::vec((0usize..80, any::<u8>()), 0..4),
            prop_oneof![Just(None), (0usize..80).prop_map(Some)],
        )
            .prop_map(|(i, edits, resize)| {
                let mut v = golden_bytes().swap_remove(i);
                if let Some(len) = resize {
                    v.resize(len, 0);
                }
                for (off, val) in edits {
                    if let Some(b) = v.get_mut(off) {
                        *b = val;
                    }
                }
                v
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_panic_and_agree(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            agree(&bytes)?;
        }

        #[test]
        fn typed_headers_agree(
            ty in prop_oneof![Just(1u8), Just(5u8), 0u8..8],
            sub in prop_oneof![Just(133u8), Just(181), Just(189), Just(202), any::<u8>()],
            ver in prop_oneof![Just(1u8), Just(2), Just(3), any::<u8>()],
            len in prop_oneof![Just(32usize), Just(36), Just(40), Just(48), Just(56), 0usize..80],
            body in proptest::collection::vec(any::<u8>(), 80),
        ) {
            let mut bytes = body;
            bytes.truncate(len);
            if let Some(b) = bytes.get_mut(0) { *b = ty; }
            if let Some(b) = bytes.get_mut(1) { *b = sub; }
            if let Some(b) = bytes.get_mut(14) { *b = ver; }
            if let Some(b) = bytes.get_mut(15) { *b = 0; }
            agree(&bytes)?;
        }

        #[test]
        fn golden_mutations_agree(bytes in mutated_golden()) {
            agree(&bytes)?;
        }
    }

    #[test]
    fn error_kinds_map_to_kernel_stats() {
        assert_eq!(DecodeErrorKind::Truncated.stat(), Stat::MalformedTruncated);
        assert_eq!(DecodeErrorKind::UnknownVersion.stat(), Stat::MalformedVersion);
        assert_eq!(DecodeErrorKind::BadField.stat(), Stat::MalformedField);
    }

    #[test]
    fn other_types_need_only_a_header() {
        let mut trace = vec![0u8; 16];
        trace[0] = notify_type::TRACE;
        assert_eq!(decode(&trace), Ok(Notification::Other { notify_type: notify_type::TRACE }));
        assert_eq!(expected_flow_key(&trace), Ok(None));
        assert_eq!(decode(&trace[..15]).map_err(|e| e.kind()), Err(DecodeErrorKind::Truncated));
        assert_eq!(expected_flow_key(&trace[..15]).map_err(|e| e.kind()), Err(DecodeErrorKind::Truncated));
        assert_eq!(decode(&[]).map_err(|e| e.kind()), Err(DecodeErrorKind::Truncated));
    }
}
