//! The `agent` binary.
fn main() {
    println!("agent {}", env!("CARGO_PKG_VERSION"));
}
