//! Copying a notification out of a test packet (replay entry and emitter).
//!
//! Every read is a constant size after a constant bounds check
//! (`data + N <= data_end`), the one pattern every verifier since 4.x
//! accepts. Variable-length `bpf_skb_load_bytes` is rejected by verifiers
//! before ~6.8 ("invalid zero-sized read"), and LLVM turns a byte loop into
//! variable packet offsets that 6.1 rejects.
//!
//! The copied prefix is the longest of [`PREFIXES`] that fits: every size
//! any Cilium release uses for the notifications we decode (16, 32, 36, 40,
//! 48) is on the ladder, and the steps of 4 make it exact for every length
//! that is a multiple of 4 (all of Cilium's structs are).

use aya_ebpf::programs::TcContext;
use verdict_common::maps::MAX_NOTIFICATION_SIZE;

macro_rules! ladder {
    ($data:ident, $end:ident, $buf:ident, $($n:literal),+) => {
        $(
            if $data + $n <= $end {
                // SAFETY: the verifier-checked range [data, data + n) is in the packet.
                let src: [u8; $n] = unsafe { core::ptr::read_unaligned($data as *const [u8; $n]) };
                $buf[..$n].copy_from_slice(&src);
                return $n;
            }
        )+
    };
}

/// Copies the longest prefix of the packet from the ladder into `buf`;
/// returns its length (0 when the packet is shorter than 4 bytes).
#[inline(always)]
pub fn copy_packet(ctx: &TcContext, buf: &mut [u8; MAX_NOTIFICATION_SIZE]) -> usize {
    let data = ctx.data();
    let end = ctx.data_end();
    ladder!(data, end, buf, 64, 60, 56, 52, 48, 44, 40, 36, 32, 28, 24, 20, 16, 12, 8, 4);
    0
}
