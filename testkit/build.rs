//! Builds the test-support eBPF programs (`testkit/ebpf`: replay, benchmark,
//! emitter) the way `agent/build.rs` builds the shipped tap, into this
//! crate's OUT_DIR, where `src/objects.rs` embeds them. Only this crate
//! embeds them: the shipped binary never contains them.
fn main() -> anyhow::Result<()> {
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/ebpf");
    aya_build::build_ebpf(
        [aya_build::Package { name: "verdict-testkit-ebpf", root_dir: root, ..Default::default() }],
        aya_build::Toolchain::Custom("stable"),
    )
}
