//! Placeholder: the guest-side benchmark runner is being written.
fn main() {}
