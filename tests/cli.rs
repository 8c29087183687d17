//! Host tests of the `numapin` command line: argument handling and error
//! reporting that need no IOMMU.

use std::process::Command;

fn numapin(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_numapin"))
        .args(args)
        .output()
        .expect("run numapin")
}

#[test]
fn bad_region_spec_is_a_usage_error() {
    let out = numapin(&["pin", "--device", "0000:00:03.0", "--region", "0:12Q"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("expected NODE:SIZE[:PAGESIZE][@IOVA]"), "{err}");
}
