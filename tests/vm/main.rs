//! Guest-side test runner (placeholder until the scenarios land).
//! Protocol: JSON lines on the results path: plan, one result per scenario, done.
use std::io::Write;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |k: &str| args.iter().position(|a| a == k).and_then(|i| args.get(i + 1)).cloned();
    let suite = arg("--suite").unwrap_or_else(|| "type1".into());
    let results = arg("--results").unwrap_or_else(|| "/dev/ttyS1".into());
    let mut out = std::fs::OpenOptions::new().write(true).open(&results).expect("open results");
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    writeln!(out, "{{\"type\":\"plan\",\"suite\":\"{suite}\",\"kernel\":\"{}\",\"scenarios\":[\"boot\"]}}", kernel.trim()).unwrap();
    let ok = std::path::Path::new("/dev/vfio/vfio").exists();
    writeln!(out, "{{\"type\":\"result\",\"name\":\"boot\",\"status\":\"{}\",\"secs\":0.0,\"detail\":\"/dev/vfio/vfio exists: {ok}\"}}", if ok {"pass"} else {"fail"}).unwrap();
    writeln!(out, "{{\"type\":\"done\"}}").unwrap();
}
