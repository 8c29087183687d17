//! Host tests of the `numapin` command line: argument handling and error
//! reporting that need no IOMMU, no VFIO device and no privileges.
//!
//! The contract checked here: a malformed command line exits 2 (clap's usage
//! error) and names the accepted form; a command that parses but cannot run
//! exits 1 with exactly one line on stderr, `numapin: error: …`, that says
//! what to do, and prints nothing on stdout (so `--json` consumers never see
//! half a document).

use std::process::{Command, Output};

/// A PCI address no machine has: the last function of the last device on the
/// last bus of domain 0.
const MISSING: &str = "0000:ff:1f.7";

/// The accepted region form, as every region parse error states it.
const REGION_FORM: &str = "expected NODE:SIZE[:PAGESIZE][@IOVA]";

fn numapin(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_numapin"))
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .expect("run numapin")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts a clap usage error (exit 2) whose message contains every needle.
fn assert_usage_error(args: &[&str], needles: &[&str]) {
    let out = numapin(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert!(
        stdout(&out).is_empty(),
        "{args:?} printed on stdout: {}",
        stdout(&out)
    );
    for n in needles {
        assert!(err.contains(n), "{args:?}: stderr lacks `{n}`:\n{err}");
    }
}

/// Asserts a failure of the usage class (a device that does not exist, a
/// missing edu device): exit 2, exactly one stderr line that starts with
/// `numapin: error: ` and contains every needle, and on stdout nothing —
/// or, with `--json`, the error object `{"error": {"kind": "usage", ..}}`.
fn assert_one_line_error(args: &[&str], needles: &[&str]) -> String {
    let out = numapin(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    if args.contains(&"--json") {
        let doc: serde_json::Value = serde_json::from_str(&stdout(&out))
            .unwrap_or_else(|e| panic!("{args:?}: stdout is not JSON ({e}): {}", stdout(&out)));
        assert_eq!(doc["error"]["kind"], "usage", "{args:?}: {doc}");
        let message = doc["error"]["message"].as_str().unwrap_or_default();
        assert!(err.contains(message), "{args:?}: {doc} vs {err}");
        assert!(doc["error"]["hint"].is_string(), "{args:?}: {doc}");
    } else {
        assert!(
            stdout(&out).is_empty(),
            "{args:?} printed on stdout: {}",
            stdout(&out)
        );
    }
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: want one stderr line, got:\n{err}"
    );
    assert!(lines[0].starts_with("numapin: error: "), "{args:?}: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: stderr lacks `{n}`:\n{err}");
    }
    err
}

/// `pin --device MISSING --region=SPEC`; the `=` form lets a spec that starts
/// with `-` reach the region parser instead of clap's flag matching.
fn pin_region_args(spec: &str) -> Vec<String> {
    vec![
        "pin".into(),
        "--device".into(),
        MISSING.into(),
        format!("--region={spec}"),
    ]
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn bad_region_spec_is_a_usage_error() {
    let out = numapin(&["pin", "--device", "0000:00:03.0", "--region", "0:12Q"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains(REGION_FORM), "{err}");
}

#[test]
fn every_malformed_region_form_names_the_form_and_the_fault() {
    // (spec, what the message must say is wrong with it)
    let cases = [
        ("", "wrong number of `:` fields"),
        ("0", "wrong number of `:` fields"),
        ("0:1M:2M:4K", "wrong number of `:` fields"),
        (":1M", "is not a node number"),
        ("x:1M", "`x` is not a node number"),
        ("-1:4K", "`-1` is not a node number"),
        ("0:", "empty value"),
        ("0:12Q", "`12Q` is not a size"),
        ("0:M", "`M` is not a size"),
        ("0:99999999999T", "too large for a 64-bit size"),
        (
            "0:1M@4096",
            "`4096` is not an address; write addresses as 0x-prefixed hex",
        ),
        ("0:1M@0x", "`0x` is not an address"),
        ("0:1M@0xfeeg0000", "`0xfeeg0000` is not an address"),
        (
            "0:1M@0x1ffffffffffffffff",
            "too large for a 64-bit size or address",
        ),
        ("1:1G:2M@", "empty value"),
    ];
    for (spec, why) in cases {
        let args = pin_region_args(spec);
        assert_usage_error(
            &as_strs(&args),
            &[
                &format!("bad region `{spec}`"),
                why,
                REGION_FORM,
                "e.g. 0:512M",
            ],
        );
    }
}

#[test]
fn bad_page_size_lists_the_supported_ones() {
    for ps in ["3M", "8K", "huge", "4M", "2G"] {
        let spec = format!("0:1G:{ps}");
        let args = pin_region_args(&spec);
        assert_usage_error(
            &as_strs(&args),
            &[
                &format!("`{ps}` is not a page size numapin supports"),
                "use 4K, 2M or 1G",
                REGION_FORM,
            ],
        );
    }
}

#[test]
fn good_region_specs_pass_parsing_and_fail_only_on_the_device() {
    // These parse and fit node 0 of any machine with 1 GiB, so the failure
    // must come from the missing device (the error names it), never from
    // argument handling or the region checks.
    for spec in [
        "0:512M",
        "0:64M:4K@0x100000000",
        "0:4096",
        "0:0x200000",
        "0:1GiB",
        "0:4K@0x200000",
    ] {
        let args = pin_region_args(spec);
        assert_one_line_error(&as_strs(&args), &["no device `0000:ff:1f.7`", "lspci -D"]);
    }
}

#[test]
fn regions_are_checked_before_the_device_is_looked_at() {
    // The device does not exist: an error about the region proves the
    // region was checked first.
    let online: Vec<String> = numapin::numa::Topology::read()
        .expect("read topology")
        .ids()
        .iter()
        .map(|n| n.to_string())
        .collect();
    let cases: Vec<(&str, String)> = vec![
        ("0:0", "region size is 0; give a size such as 64M".into()),
        (
            "0:64",
            "region `0:64` asks for 64 bytes: a size without a unit is in bytes, and 64 is less \
             than one 4 KiB page; write the unit, e.g. `0:64M` for 64 MiB"
                .into(),
        ),
        ("0:4095", "`0:4095M` for 4095 MiB".into()),
        (
            "999:4M",
            format!(
                "NUMA node 999 is not online; online nodes: {}",
                online.join(", ")
            ),
        ),
        ("0:4097", "is not a multiple of the 4K page size".into()),
        ("0:3M:2M", "is not a multiple of the 2M page size".into()),
        (
            "0:4M:2M@0x100000",
            "IOVA 0x100000 is not aligned to the region's 2M page size".into(),
        ),
        ("0:1T", "ask node 0 for 1 TiB but it has".into()),
    ];
    for (spec, want) in &cases {
        let args = pin_region_args(spec);
        let err = assert_one_line_error(&as_strs(&args), &[want]);
        assert!(!err.contains("no device"), "{spec}: {err}");
    }
    // A unit, even a byte unit, is taken at its word.
    let args = pin_region_args("0:64B");
    assert_one_line_error(&as_strs(&args), &["is not a multiple of the 4K page size"]);
}

#[test]
fn pin_needs_a_device_and_a_region() {
    assert_usage_error(&["pin", "--device", MISSING], &["required", "--region"]);
    assert_usage_error(&["pin", "--region", "0:1M"], &["required", "--device"]);
}

#[test]
fn hold_and_hold_forever_conflict() {
    assert_usage_error(
        &[
            "pin",
            "--device",
            MISSING,
            "--region",
            "0:1M",
            "--hold",
            "5",
            "--hold-forever",
        ],
        &["'--hold <SECS>' cannot be used with '--hold-forever'"],
    );
    assert_usage_error(
        &[
            "pin",
            "--device",
            MISSING,
            "--region",
            "0:1M",
            "--hold-forever",
            "--hold",
            "5",
        ],
        &["cannot be used with", "--hold"],
    );
}

#[test]
fn hold_and_threads_take_whole_numbers() {
    for bad in ["abc", "-1", "1.5", "10s"] {
        let arg = format!("--hold={bad}");
        assert_usage_error(
            &["pin", "--device", MISSING, "--region", "0:1M", &arg],
            &[&format!("invalid value '{bad}' for '--hold <SECS>'")],
        );
    }
    assert_usage_error(
        &[
            "pin",
            "--device",
            MISSING,
            "--region",
            "0:1M",
            "--threads",
            "many",
        ],
        &["invalid value 'many' for '--threads"],
    );
}

#[test]
fn info_of_a_missing_device_is_one_line_naming_lspci() {
    for extra in [&[][..], &["--json"][..]] {
        let mut args = vec!["info", "--device", MISSING];
        args.extend_from_slice(extra);
        assert_one_line_error(
            &args,
            &[
                "no device `0000:ff:1f.7` (/sys/bus/pci/devices/0000:ff:1f.7)",
                "list PCI devices with `lspci -D`",
            ],
        );
    }
    // The short form of a PCI address is looked up in domain 0000.
    assert_one_line_error(
        &["info", "-d", "ff:1f.7"],
        &[
            "no device `ff:1f.7` (/sys/bus/pci/devices/0000:ff:1f.7)",
            "lspci -D",
        ],
    );
}

#[test]
fn pin_of_a_missing_device_is_one_line_naming_lspci() {
    for extra in [&[][..], &["--json", "--phys"][..], &["--hold", "0"][..]] {
        let mut args = vec!["pin", "--device", MISSING, "--region", "0:4M"];
        args.extend_from_slice(extra);
        assert_one_line_error(&args, &["no device `0000:ff:1f.7`", "lspci -D"]);
    }
}

#[test]
fn bind_and_unbind_of_a_missing_device_change_nothing_and_say_why() {
    for cmd in ["bind", "unbind"] {
        assert_one_line_error(
            &[cmd, MISSING],
            &[
                "no device `0000:ff:1f.7` (/sys/bus/pci/devices/0000:ff:1f.7)",
                "lspci -D",
            ],
        );
    }
    for flags in [
        &["--dry-run"][..],
        &["--force"][..],
        &["--force", "--dry-run"][..],
    ] {
        for cmd in ["bind", "unbind"] {
            let mut args = vec![cmd, MISSING];
            args.extend_from_slice(flags);
            assert_one_line_error(&args, &["no device `0000:ff:1f.7`", "lspci -D"]);
        }
    }
    assert_usage_error(&["bind"], &["required", "<DEVICE>"]);
}

#[test]
fn topology_json_has_the_nodes_the_library_sees() {
    let out = numapin(&["topology", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let doc: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("topology --json is one JSON document");
    let nodes = doc["nodes"].as_array().expect("a `nodes` array");
    assert!(!nodes.is_empty(), "no nodes: {doc}");
    let ids: Vec<u64> = nodes
        .iter()
        .map(|n| n["id"].as_u64().expect("numeric node id"))
        .collect();
    let want: Vec<u64> = numapin::numa::Topology::read()
        .expect("read topology")
        .ids()
        .iter()
        .map(|n| u64::from(n.0))
        .collect();
    assert_eq!(ids, want);
    let mut listed = 0;
    for n in nodes {
        assert!(n["cpus"].is_array(), "{n}");
        assert!(n["mem_total"].is_u64() && n["mem_free"].is_u64(), "{n}");
        // Distances: one per online node, 10 to itself.
        let id = n["id"].as_u64().unwrap();
        let dist = n["distances"].as_object().expect("a `distances` map");
        if !dist.is_empty() {
            assert_eq!(dist.len(), nodes.len(), "{n}");
            assert_eq!(dist[&id.to_string()], 10, "{n}");
        }
        for d in n["pci_devices"].as_array().expect("pci_devices array") {
            let path = format!("/sys/bus/pci/devices/{}/numa_node", d.as_str().unwrap());
            let raw = std::fs::read_to_string(&path).expect("numa_node");
            assert_eq!(raw.trim(), id.to_string(), "{path}");
            listed += 1;
        }
        for pool in n["hugepages"].as_array().expect("hugepages array") {
            let size = pool["page_size"].as_u64().expect("page_size in bytes");
            assert!(size.is_power_of_two() && size > 4096, "{pool}");
            assert!(pool["free"].as_u64() <= pool["total"].as_u64(), "{pool}");
        }
    }
    // Every PCI device is under its node or in devices_without_node.
    listed += doc["devices_without_node"].as_array().expect("array").len();
    let all = std::fs::read_dir("/sys/bus/pci/devices").map_or(0, |d| d.count());
    assert_eq!(listed, all, "{doc}");
}

#[test]
fn topology_table_has_a_header_and_a_row_per_node() {
    let out = numapin(&["topology"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .expect("a header line")
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["node", "cpus", "total", "free", "distances", "hugepages"]
    );
    let rows: Vec<&str> = lines.by_ref().take_while(|l| !l.is_empty()).collect();
    let ids = numapin::numa::Topology::read()
        .expect("read topology")
        .ids();
    assert_eq!(rows.len(), ids.len(), "{text}");
    for (row, id) in rows.iter().zip(&ids) {
        assert_eq!(
            row.split_whitespace().next(),
            Some(id.to_string().as_str()),
            "{text}"
        );
    }
    let rest: Vec<&str> = lines.collect();
    for id in &ids {
        assert!(
            rest.iter()
                .any(|l| l.starts_with(&format!("node {id} PCI devices: "))),
            "{text}"
        );
    }
    assert!(
        rest.iter()
            .any(|l| l.starts_with("no node (numa_node -1): ")),
        "{text}"
    );
}

#[test]
fn demo_without_the_edu_device_points_at_the_vm() {
    assert!(
        numapin::edu::find().is_none(),
        "this host has a QEMU edu device; the test expects a host without one"
    );
    assert_one_line_error(
        &["demo"],
        &["no QEMU edu device (1234:11e8) found", "`cargo xtask demo`"],
    );
    // A named device is resolved first, before the two-node check.
    let want: &[&str] = &["no device `0000:ff:1f.7`", "lspci -D"];
    assert_one_line_error(&["demo", "--device", MISSING], want);
    assert_usage_error(
        &["demo", "--size", "12Q"],
        &[
            "invalid value '12Q' for '--size <SIZE>'",
            "`12Q` is not a size",
        ],
    );
}

#[test]
fn help_lists_every_subcommand() {
    let out = numapin(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    for cmd in ["topology", "bind", "unbind", "info", "check", "pin", "demo"] {
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with(&format!("{cmd} "))),
            "--help lacks `{cmd}`:\n{text}"
        );
    }
    // The generator behind `cargo xtask dist` is not offered to users.
    assert!(!text.contains("__generate"), "{text}");
    // No subcommand is a usage error, not a silent success.
    let out = numapin(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert_usage_error(&["frobnicate"], &["unrecognized subcommand 'frobnicate'"]);
}

#[test]
fn info_checks_nodes_and_regions_before_the_device() {
    assert_one_line_error(
        &["info", "--device", MISSING, "--node", "999"],
        &["NUMA node 999 is not online"],
    );
    assert_one_line_error(
        &["info", "--device", MISSING, "--region", "0:64"],
        &["a size without a unit is in bytes"],
    );
    assert_one_line_error(
        &["info", "--device", MISSING, "--node", "0"],
        &["no device `0000:ff:1f.7`"],
    );
}

/// Runs `check --json ARGS`; returns (exit code, document, stderr).
fn check_json(args: &[&str]) -> (Option<i32>, serde_json::Value, String) {
    let mut full = vec!["check", "--json"];
    full.extend_from_slice(args);
    let out = numapin(&full);
    let doc: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("check --json is one JSON document");
    (out.status.code(), doc, stderr(&out))
}

fn check_of<'a>(doc: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    doc["checks"]
        .as_array()
        .expect("checks array")
        .iter()
        .find(|c| c["check"] == name)
        .unwrap_or_else(|| panic!("no `{name}` check in {doc}"))
}

#[test]
fn check_reports_every_check_and_exits_by_them() {
    let (code, doc, err) = check_json(&[]);
    let names: Vec<&str> = doc["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["check"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "iommu",
            "vfio-pci",
            "group",
            "regions",
            "memlock",
            "hugepages",
            "io_uring",
            "numa-balancing"
        ]
    );
    let failed: Vec<&str> = doc["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] == "fail")
        .map(|c| {
            assert!(c["fix"].is_string(), "a failed check without a fix: {c}");
            c["check"].as_str().unwrap()
        })
        .collect();
    assert_eq!(doc["ok"], failed.is_empty(), "{doc}");
    // A failed preflight is a device-state error: exit 5.
    assert_eq!(code, Some(if failed.is_empty() { 0 } else { 5 }), "{err}");
    if !failed.is_empty() {
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(&failed.join(", ")), "{err}");
    }
    // The IOMMU check agrees with /sys/class/iommu.
    let units = std::fs::read_dir("/sys/class/iommu").map_or(0, |d| d.count());
    let iommu = check_of(&doc, "iommu");
    if units > 0 {
        assert_eq!(iommu["status"], "ok", "{iommu}");
    }
    assert_eq!(check_of(&doc, "numa-balancing")["status"], "info");
}

#[test]
fn check_fails_a_bad_region_and_a_missing_device_with_their_fixes() {
    let (code, doc, err) = check_json(&["--region", "0:64", "--device", MISSING]);
    assert_eq!(code, Some(5), "{err}");
    let r = check_of(&doc, "regions");
    assert_eq!(r["status"], "fail", "{r}");
    assert!(
        r["fix"].as_str().unwrap().contains("`0:64M` for 64 MiB"),
        "{r}"
    );
    let g = check_of(&doc, "group");
    assert_eq!(g["status"], "fail", "{g}");
    assert!(g["fix"].as_str().unwrap().contains("lspci -D"), "{g}");
    assert!(err.contains("regions") && err.contains("group"), "{err}");
    // A region that fits: the regions check passes, and memlock compares.
    let (_, doc, _) = check_json(&["--region", "0:8M"]);
    assert_eq!(check_of(&doc, "regions")["status"], "ok", "{doc}");
    assert_ne!(check_of(&doc, "memlock")["status"], "info", "{doc}");
}

#[test]
fn check_table_has_a_row_per_check() {
    let out = numapin(&["check"]);
    let text = stdout(&out);
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["check", "status", "detail"]);
    for name in ["iommu", "vfio-pci", "memlock", "io_uring", "numa-balancing"] {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("{name} "))),
            "no `{name}` row:\n{text}"
        );
    }
    // Every FAIL row is followed by its fix.
    let rows: Vec<&str> = text.lines().collect();
    for (i, l) in rows.iter().enumerate() {
        if l.split_whitespace().nth(1) == Some("FAIL") {
            assert!(rows[i + 1].trim_start().starts_with("fix: "), "{text}");
        }
    }
}

/// Every file under `dir`, relative to it.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn dist_is_fresh() {
    // Regenerate the completions and man pages from this build's clap
    // definitions; they must equal what is committed under dist/.
    let tmp = tempfile::tempdir().unwrap();
    let out = numapin(&["__generate", tmp.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let committed = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("dist");
    let stale = "dist/ is stale: run `cargo xtask dist` and commit the result";
    for sub in ["completions", "man"] {
        let fresh = files_under(&tmp.path().join(sub));
        let have = files_under(&committed.join(sub));
        assert_eq!(fresh, have, "{stale} (files differ in dist/{sub})");
        for f in &fresh {
            let a = std::fs::read(tmp.path().join(sub).join(f)).unwrap();
            let b = std::fs::read(committed.join(sub).join(f)).unwrap();
            assert!(a == b, "{stale} (dist/{sub}/{} differs)", f.display());
        }
    }
    for name in ["numapin.bash", "_numapin", "numapin.fish"] {
        let text = std::fs::read_to_string(tmp.path().join("completions").join(name)).unwrap();
        assert!(text.contains("check") && text.contains("dry-run"), "{name}");
        assert!(!text.contains("__generate"), "{name} offers the generator");
    }
    let man = std::fs::read_to_string(tmp.path().join("man/numapin.1")).unwrap();
    assert!(man.contains(".TH numapin 1"), "{man}");
}
