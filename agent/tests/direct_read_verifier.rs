//! The shipped direct-read tap through this kernel's verifier: the tap
//! object patched for the running kernel (as the loader patches it), and
//! `tap_fentry_direct` loaded against `bpf_skb_event_output` (load only:
//! attaching is what the VM tests do, on the kernels they boot). Skipped,
//! with the reason, on kernels without `BPF_FEAT_RDONLY_CAST_TO_VOID`.
//!
//! Needs root (CAP_BPF, CAP_PERFMON) and kernel BTF.

use std::path::Path;

use aya::{Btf, EbpfLoader, programs::FEntry};
use verdict_agent::bpf::{
    btf::KernelBtf,
    direct_read::{patch_rdonly_cast, rdonly_cast_to_void},
    objects::TAP_OBJECT,
};

#[test]
fn the_direct_read_tap_passes_this_kernels_verifier() {
    let path = Path::new("/sys/kernel/btf/vmlinux");
    if !path.exists() {
        eprintln!("skipped: no kernel BTF at {}", path.display());
        return;
    }
    let Some(btf_id) = rdonly_cast_to_void(&KernelBtf::load(path).unwrap()).unwrap() else {
        eprintln!(
            "skipped: this kernel's BTF has no BPF_FEAT_RDONLY_CAST_TO_VOID (Linux < 6.17): the agent uses the \
             probe-read tap here, which the VM tests run"
        );
        return;
    };
    let (image, patched) = patch_rdonly_cast(TAP_OBJECT, btf_id);
    assert!(patched > 0);
    let mut ebpf = EbpfLoader::new().load(image.bytes()).expect("loading the patched tap object (root needed)");
    let btf = Btf::from_sys_fs().unwrap();
    // The probe-read tap first: a kernel that refuses every tracing program
    // (lockdown, a sandbox) says nothing about the direct one.
    let probe_read: &mut FEntry = ebpf.program_mut("tap_fentry").unwrap().try_into().unwrap();
    if let Err(e) = probe_read.load("bpf_skb_event_output", &btf) {
        eprintln!(
            "skipped: this kernel refuses the probe-read fentry tap too ({}); the VM tests load and attach both",
            verdict_agent::errors::chain(&e)
        );
        return;
    }
    let direct: &mut FEntry = ebpf.program_mut("tap_fentry_direct").unwrap().try_into().unwrap();
    if let Err(e) = direct.load("bpf_skb_event_output", &btf) {
        panic!("the verifier took tap_fentry and refused tap_fentry_direct: {}", verdict_agent::errors::chain(&e));
    }
}
