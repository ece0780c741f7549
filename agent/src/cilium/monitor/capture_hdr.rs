//! `NOTIFY_CAPTURE_HDR` (`bpf/lib/common.h@v1.12.16`..`@v1.18.3`,
//! `bpf/lib/notify.h@main`): the 16 bytes in front of every drop, trace and
//! policy-verdict notification.

use verdict_common::{
    cilium::capture_hdr as off,
    classify::{self, u16_at, u32_at},
};

use super::DecodeError;

/// The capture header, C field order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotifyCaptureHdr {
    /// `type`: `CILIUM_NOTIFY_*`.
    pub notify_type: u8,
    /// `subtype`: the drop reason for drops, 0 for policy verdicts, the
    /// observation point for traces.
    pub subtype: u8,
    /// `source`: `EVENT_SOURCE`, the endpoint ID of the program that sent it
    /// (the host endpoint's ID in bpf_host, 0 in bpf_overlay).
    pub source: u16,
    /// `hash`: skb hash; `get_hash()` from v1.16 often leaves it 0.
    pub hash: u32,
    /// `len_orig`: length of the whole packet.
    pub len_orig: u32,
    /// `len_cap`: packet bytes appended after the struct.
    pub len_cap: u16,
    /// Byte 14: `version` (u8) from v1.19; the first byte of the u16
    /// `version` up to v1.18.
    pub version: u8,
    /// Byte 15: `ext_version` from v1.19 (0 upstream, non-zero when a
    /// downstream extension follows the struct); the second byte of the u16
    /// `version` up to v1.18.
    pub ext_version: u8,
}

impl NotifyCaptureHdr {
    pub const SIZE: usize = off::SIZE;

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() < Self::SIZE {
            return Err(DecodeError::Truncated { what: "notification header", need: Self::SIZE, got: bytes.len() });
        }
        let b = classify::copy_prefix(bytes);
        Ok(NotifyCaptureHdr {
            notify_type: b[off::TYPE],
            subtype: b[off::SUBTYPE],
            source: u16_at(&b, off::SOURCE),
            hash: u32_at(&b, off::HASH),
            len_orig: u32_at(&b, off::LEN_ORIG),
            len_cap: u16_at(&b, off::LEN_CAP),
            version: b[off::VERSION],
            ext_version: b[off::EXT_VERSION],
        })
    }

    /// Bytes 14–15 read as the u16 `version` of v1.12–v1.18, in host order
    /// as the classifier reads it.
    pub fn version_u16(&self) -> u16 {
        u16::from_ne_bytes([self.version, self.ext_version])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_at_their_c_offsets() {
        let mut b = [0u8; 16];
        b[0] = 5;
        b[1] = 0;
        b[2..4].copy_from_slice(&0x0102u16.to_ne_bytes());
        b[4..8].copy_from_slice(&0xdeadbeefu32.to_ne_bytes());
        b[8..12].copy_from_slice(&1500u32.to_ne_bytes());
        b[12..14].copy_from_slice(&128u16.to_ne_bytes());
        b[14..16].copy_from_slice(&1u16.to_ne_bytes());
        let h = NotifyCaptureHdr::decode(&b).unwrap();
        assert_eq!(h.notify_type, 5);
        assert_eq!(h.source, 0x0102);
        assert_eq!(h.hash, 0xdeadbeef);
        assert_eq!(h.len_orig, 1500);
        assert_eq!(h.len_cap, 128);
        assert_eq!(h.version_u16(), 1);
        assert!(NotifyCaptureHdr::decode(&b[..15]).is_err());
    }
}
