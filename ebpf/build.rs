//! Makes cargo rebuild the program when bpf-linker changes (it is the program's linker).
use which::which;

fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
