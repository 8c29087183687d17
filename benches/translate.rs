//! Placeholder: the translation benchmark is being written.
fn main() {}
