//! The direct-read tap's one kfunc call, resolved for the running kernel.
//!
//! `tap_fentry_direct` reads the notification with plain loads through
//! `bpf_rdonly_cast(meta, 0)` (see `agent-ebpf/src/tap.rs`, `DirectRead`).
//! The call is compiled as a raw kfunc instruction whose immediate is
//! [`RDONLY_CAST_MARKER`]; aya has no kfunc relocations, so this module
//! writes the kernel's BTF ID of `bpf_rdonly_cast` into a copy of the object
//! before it is loaded. A kernel accepts the cast to `void` only when its
//! BTF announces `BPF_FEAT_RDONLY_CAST_TO_VOID` (Linux 6.17 and later);
//! elsewhere the object is loaded unpatched and the direct program is never
//! loaded (the verifier would refuse it).

use verdict_common::maps::RDONLY_CAST_MARKER;

use super::btf::{BtfError, KernelBtf};

/// The kfunc the direct-read tap calls.
pub const RDONLY_CAST: &str = "bpf_rdonly_cast";

/// BTF ID of `bpf_rdonly_cast` if this kernel lets a program cast to
/// `void` with it, else None.
pub fn rdonly_cast_to_void(btf: &KernelBtf) -> Result<Option<u32>, BtfError> {
    if !btf.enum_has_value("bpf_features", "BPF_FEAT_RDONLY_CAST_TO_VOID")? {
        return Ok(None);
    }
    btf.function_id(RDONLY_CAST)
}

/// An object image, 8-byte aligned as the ELF parser needs.
pub struct ObjectImage {
    words: Vec<u64>,
    len: usize,
}

impl ObjectImage {
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `words` holds at least `len` initialized bytes; u8 has no alignment.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `self` is borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

/// The raw instruction as compiled: `BPF_JMP | BPF_CALL` (0x85), src_reg
/// `BPF_PSEUDO_KFUNC_CALL` (2) in the high nibble of the register byte,
/// offset 0 (vmlinux BTF), immediate the marker (little-endian, as BPF
/// objects for x86-64 and arm64 are).
fn marked_call() -> [u8; 8] {
    let mut insn = [0x85, 0x20, 0, 0, 0, 0, 0, 0];
    insn[4..].copy_from_slice(&RDONLY_CAST_MARKER.to_le_bytes());
    insn
}

/// A copy of `object` with every marked kfunc call pointing at `btf_id`;
/// returns it with the number of calls patched.
pub fn patch_rdonly_cast(object: &[u8], btf_id: u32) -> (ObjectImage, usize) {
    let mut image = ObjectImage { words: vec![0u64; object.len().div_ceil(8)], len: object.len() };
    image.bytes_mut().copy_from_slice(object);
    let marked = marked_call();
    let mut patched = 0;
    let bytes = image.bytes_mut();
    // Instructions are 8-byte aligned in their sections, and sections in
    // the file.
    for insn in bytes.chunks_exact_mut(8) {
        if *insn == marked {
            insn[4..].copy_from_slice(&btf_id.to_le_bytes());
            patched += 1;
        }
    }
    (image, patched)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::objects::TAP_OBJECT;

    #[test]
    fn the_shipped_object_has_exactly_the_marked_calls_of_the_direct_tap() {
        let (image, patched) = patch_rdonly_cast(TAP_OBJECT, 4242);
        assert!(patched >= 1, "no marked bpf_rdonly_cast call in the tap object");
        assert_eq!(image.bytes().len(), TAP_OBJECT.len());
        let (_, again) = patch_rdonly_cast(image.bytes(), 4242);
        assert_eq!(again, 0, "every marked call was patched");
        let mut expected = marked_call();
        expected[4..].copy_from_slice(&4242u32.to_le_bytes());
        let found = image.bytes().chunks_exact(8).filter(|i| *i == expected).count();
        assert_eq!(found, patched);
        // Only the direct program calls it: the probe-read programs are untouched.
        let object = aya_obj::Object::parse(image.bytes()).expect("the patched object parses");
        for (name, program) in &object.programs {
            let function = &object.functions[&program.function_key()];
            let calls = function.instructions.iter().filter(|i| i.code == 0x85 && i.src_reg() == 2).count();
            if name == "tap_fentry_direct" {
                assert_eq!(calls, patched, "{name}");
            } else {
                assert_eq!(calls, 0, "{name} calls a kfunc");
            }
        }
    }

    #[test]
    fn this_kernel_says_whether_it_accepts_the_cast() {
        let path = std::path::Path::new("/sys/kernel/btf/vmlinux");
        if !path.exists() {
            eprintln!("skipped: no kernel BTF at {} (CONFIG_DEBUG_INFO_BTF)", path.display());
            return;
        }
        let btf = KernelBtf::load(path).unwrap();
        let id = rdonly_cast_to_void(&btf).unwrap();
        let release = crate::bpf::privileges::kernel_version();
        eprintln!("kernel {release:?}: bpf_rdonly_cast to void {id:?}");
        if let Some((major, minor)) = release
            && (major, minor) >= (6, 17)
        {
            assert!(id.is_some(), "Linux {major}.{minor} should announce BPF_FEAT_RDONLY_CAST_TO_VOID");
        }
        if let Some(id) = id {
            assert_eq!(btf.function_id(RDONLY_CAST).unwrap(), Some(id));
        }
    }
}
