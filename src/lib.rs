//! numapin: node-local memory that the kernel guarantees will never move.
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

pub mod addr;
