//! Builds the eBPF programs the canonical aya way: aya-build compiles
//! `agent-ebpf` for the BPF target and drops the objects in OUT_DIR, where
//! `src/bpf/objects.rs` embeds them.
//!
//! Stable Rust only: `-Z build-std=core` (which the BPF target needs) is
//! allowed by RUSTC_BOOTSTRAP=1 for that inner build.
fn main() -> anyhow::Result<()> {
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../agent-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package { name: "verdict-agent-ebpf", root_dir: root, ..Default::default() }],
        aya_build::Toolchain::Custom("stable"),
    )
}
