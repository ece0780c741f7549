// Rebuild when the linker changes: the BPF target links with bpf-linker.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
