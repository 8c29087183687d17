//! The results protocol: JSON lines the guest writes to `/dev/ttyS1`, which
//! QEMU puts in a host file.
//!
//! ```text
//! {"type":"plan","suite":"type1","kernel":"6.1.0-56-amd64","scenarios":["a.placement.base", ...]}
//! {"type":"result","name":"a.placement.base","status":"pass","secs":1.23,"detail":"..."}
//! {"type":"done"}
//! {"type":"exit","code":0}        (written by /init after the program ends)
//! ```
//!
//! A run passes only if a plan came, every planned scenario has exactly one
//! result and it is `pass`, `done` came, and nothing else went wrong.
//!
//! The benchmark runner (`numapin-bench`) speaks the same protocol: its
//! scenarios are the measurement phases, and between plan and done it also
//! sends the samples of each figure and facts about the guest:
//!
//! ```text
//! {"type":"measure","mode":"thp","size":67108864,"metric":"floor.map","unit":"s","samples":[0.0012, ...]}
//! {"type":"info","key":"node0.cpus","value":"0-1"}
//! ```

use serde::Deserialize;

/// The problem of a run whose plan lists no scenario (with `--only`, a VM
/// in which nothing matched).
pub const NO_SCENARIO: &str = "the plan lists no scenario";

#[derive(Debug, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
enum Line {
    Plan {
        suite: String,
        kernel: String,
        scenarios: Vec<String>,
    },
    Result {
        name: String,
        status: Status,
        secs: f64,
        #[serde(default)]
        detail: String,
    },
    Done,
    Exit {
        code: i32,
    },
    Measure {
        mode: String,
        size: u64,
        metric: String,
        unit: String,
        samples: Vec<f64>,
    },
    Info {
        key: String,
        value: String,
    },
}

/// The samples of one benchmark figure, as the guest measured them.
#[derive(Clone, Debug, PartialEq)]
pub struct Measurement {
    /// Page mode (`base`, `thp`, `hugetlb-2M`), or what the figure is about
    /// when it does not depend on one (e.g. `numa-balancing`).
    pub mode: String,
    /// Region size in bytes.
    pub size: u64,
    /// What was measured, e.g. `floor.map`, `numapin.pin-only`.
    pub metric: String,
    /// `s` (seconds) or `count`.
    pub unit: String,
    /// One value per repetition.
    pub samples: Vec<f64>,
}

/// A scenario's status as the guest reported it.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    Skip,
}

/// What became of one planned scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail,
    Skip,
    /// Planned, but no result line came.
    NoResult,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Pass => "PASS",
            Outcome::Fail => "FAIL",
            Outcome::Skip => "SKIP",
            Outcome::NoResult => "NO RESULT",
        }
    }
}

#[derive(Debug)]
pub struct Scenario {
    pub name: String,
    pub outcome: Outcome,
    pub secs: f64,
    pub detail: String,
}

/// Everything one VM run reported, in plan order, plus what was wrong with
/// the report itself.
#[derive(Debug, Default)]
pub struct Report {
    pub suite: Option<String>,
    pub kernel: Option<String>,
    pub scenarios: Vec<Scenario>,
    pub done: bool,
    /// The exit status of the guest program, as /init saw it.
    pub exit_code: Option<i32>,
    /// Protocol violations: no plan, no done, unparsable lines, duplicate or
    /// unplanned results, a second plan.
    pub problems: Vec<String>,
    /// Benchmark samples, in arrival order.
    pub measurements: Vec<Measurement>,
    /// Facts the guest reported (`info` lines), in arrival order.
    pub info: Vec<(String, String)>,
}

impl Report {
    /// Parses the results file. Never fails: whatever is wrong becomes a problem.
    pub fn parse(text: &str) -> Report {
        let mut report = Report::default();
        let mut planned = false;
        // Results seen before any plan, kept to report them.
        let mut results: Vec<(String, Status, f64, String)> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            // The guest tty turns "\n" into "\r\n"; a crash can leave NULs.
            let line = raw.trim_matches(|c: char| c.is_whitespace() || c == '\0');
            if line.is_empty() {
                continue;
            }
            match serde_json::from_str::<Line>(line) {
                Ok(Line::Plan {
                    suite,
                    kernel,
                    scenarios,
                }) => {
                    if planned {
                        report
                            .problems
                            .push(format!("line {}: a second plan", i + 1));
                        continue;
                    }
                    planned = true;
                    report.suite = Some(suite);
                    report.kernel = Some(kernel);
                    for name in scenarios {
                        if report.scenarios.iter().any(|s| s.name == name) {
                            report
                                .problems
                                .push(format!("scenario {name} is planned twice"));
                            continue;
                        }
                        report.scenarios.push(Scenario {
                            name,
                            outcome: Outcome::NoResult,
                            secs: 0.0,
                            detail: String::new(),
                        });
                    }
                    if report.scenarios.is_empty() {
                        report.problems.push(NO_SCENARIO.into());
                    }
                }
                Ok(Line::Result {
                    name,
                    status,
                    secs,
                    detail,
                }) => {
                    if report.done {
                        report
                            .problems
                            .push(format!("result for {name} after done"));
                    }
                    results.push((name, status, secs, detail));
                }
                Ok(Line::Done) => {
                    if report.done {
                        report
                            .problems
                            .push(format!("line {}: a second done", i + 1));
                    }
                    report.done = true;
                }
                Ok(Line::Exit { code }) => report.exit_code = Some(code),
                Ok(Line::Measure {
                    mode,
                    size,
                    metric,
                    unit,
                    samples,
                }) => report.measurements.push(Measurement {
                    mode,
                    size,
                    metric,
                    unit,
                    samples,
                }),
                Ok(Line::Info { key, value }) => report.info.push((key, value)),
                Err(err) => {
                    let shown: String = line.chars().take(120).collect();
                    report.problems.push(format!(
                        "line {}: not a protocol line ({err}): {shown}",
                        i + 1
                    ));
                }
            }
        }
        if !planned {
            report
                .problems
                .push("no plan line came (did the runner start?)".into());
        }
        for (name, status, secs, detail) in results {
            let Some(s) = report.scenarios.iter_mut().find(|s| s.name == name) else {
                report
                    .problems
                    .push(format!("result for unplanned scenario {name}"));
                continue;
            };
            if s.outcome != Outcome::NoResult {
                report
                    .problems
                    .push(format!("scenario {name} reported more than once"));
                s.outcome = Outcome::Fail;
                continue;
            }
            s.outcome = match status {
                Status::Pass => Outcome::Pass,
                Status::Fail => Outcome::Fail,
                Status::Skip => Outcome::Skip,
            };
            s.secs = secs;
            s.detail = detail;
        }
        if planned && !report.done {
            report
                .problems
                .push("no done line came (the runner stopped early)".into());
        }
        // A runner exits non-zero when a scenario failed; that is already
        // counted. Non-zero with every scenario passing is a problem of its own.
        let all_passed = report.scenarios.iter().all(|s| s.outcome == Outcome::Pass);
        match report.exit_code {
            Some(code) if code != 0 && all_passed => report.problems.push(format!(
                "the guest program exited with status {code} although no scenario failed"
            )),
            _ => {}
        }
        report
    }

    /// Whether this run proves what it set out to: no problem, and every
    /// planned scenario passed.
    pub fn passed(&self) -> bool {
        self.problems.is_empty()
            && !self.scenarios.is_empty()
            && self.scenarios.iter().all(|s| s.outcome == Outcome::Pass)
    }

    /// Scenarios with this outcome (the suite's tally counts them one by
    /// one as it names them; the parser's tests count here).
    #[cfg(test)]
    pub fn count(&self, outcome: Outcome) -> usize {
        self.scenarios
            .iter()
            .filter(|s| s.outcome == outcome)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAN: &str =
        r#"{"type":"plan","suite":"type1","kernel":"6.1.0-56-amd64","scenarios":["a","b"]}"#;

    fn lines(ls: &[&str]) -> String {
        ls.join("\r\n") + "\r\n"
    }

    #[test]
    fn a_complete_passing_run() {
        let text = lines(&[
            PLAN,
            r#"{"type":"result","name":"b","status":"pass","secs":0.5,"detail":"ok"}"#,
            r#"{"type":"result","name":"a","status":"pass","secs":1.25}"#,
            r#"{"type":"done"}"#,
            r#"{"type":"exit","code":0}"#,
        ]);
        let r = Report::parse(&text);
        assert!(r.passed(), "{:?}", r.problems);
        assert_eq!(r.kernel.as_deref(), Some("6.1.0-56-amd64"));
        assert_eq!(r.suite.as_deref(), Some("type1"));
        // Plan order, not arrival order.
        assert_eq!(r.scenarios[0].name, "a");
        assert_eq!(r.scenarios[0].secs, 1.25);
        assert_eq!(r.scenarios[1].detail, "ok");
        assert_eq!(r.count(Outcome::Pass), 2);
    }

    #[test]
    fn fail_and_skip_fail_the_run() {
        let text = lines(&[
            PLAN,
            r#"{"type":"result","name":"a","status":"fail","secs":1,"detail":"page moved"}"#,
            r#"{"type":"result","name":"b","status":"skip","secs":0,"detail":"no 1G pages"}"#,
            r#"{"type":"done"}"#,
        ]);
        let r = Report::parse(&text);
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert!(!r.passed());
        assert_eq!(r.count(Outcome::Fail), 1);
        assert_eq!(r.count(Outcome::Skip), 1);
        assert_eq!(r.scenarios[0].detail, "page moved");
    }

    #[test]
    fn a_missing_result_fails_the_run() {
        let text = lines(&[
            PLAN,
            r#"{"type":"result","name":"a","status":"pass","secs":1}"#,
            r#"{"type":"done"}"#,
        ]);
        let r = Report::parse(&text);
        assert!(!r.passed());
        assert_eq!(r.scenarios[1].outcome, Outcome::NoResult);
    }

    #[test]
    fn no_plan_no_done_and_crashes() {
        let r = Report::parse("");
        assert!(!r.passed());
        assert!(r.problems[0].contains("no plan"));

        let r = Report::parse(&lines(&[
            PLAN,
            r#"{"type":"result","name":"a","status":"pass","secs":1}"#,
        ]));
        assert!(
            r.problems.iter().any(|p| p.contains("no done")),
            "{:?}",
            r.problems
        );

        let text = lines(&[
            PLAN,
            r#"{"type":"result","name":"a","status":"pass","secs":1}"#,
            r#"{"type":"result","name":"b","status":"pass","secs":1}"#,
            r#"{"type":"done"}"#,
            r#"{"type":"exit","code":101}"#,
        ]);
        let r = Report::parse(&text);
        assert!(!r.passed());
        assert!(r.problems.iter().any(|p| p.contains("101")));

        // Exiting 1 because a scenario failed is no extra problem.
        let text = lines(&[
            PLAN,
            r#"{"type":"result","name":"a","status":"fail","secs":1}"#,
            r#"{"type":"result","name":"b","status":"pass","secs":1}"#,
            r#"{"type":"done"}"#,
            r#"{"type":"exit","code":1}"#,
        ]);
        let r = Report::parse(&text);
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(r.exit_code, Some(1));
    }

    #[test]
    fn protocol_violations_are_named() {
        let text = lines(&[
            PLAN,
            r#"{"type":"result","name":"a","status":"pass","secs":1}"#,
            r#"{"type":"result","name":"a","status":"pass","secs":1}"#,
            r#"{"type":"result","name":"zz","status":"pass","secs":1}"#,
            r#"{"type":"result","name":"b","status":"maybe","secs":1}"#,
            "OK all good",
            r#"{"type":"result","name":"b","status":"pass"#,
            r#"{"type":"done"}"#,
        ]);
        let r = Report::parse(&text);
        assert!(!r.passed());
        let all = r.problems.join("\n");
        assert!(all.contains("a reported more than once"), "{all}");
        assert!(all.contains("unplanned scenario zz"), "{all}");
        assert!(all.contains("line 5"), "{all}");
        assert!(all.contains("line 6"), "{all}");
        assert!(all.contains("line 7"), "{all}");
        assert_eq!(r.scenarios[0].outcome, Outcome::Fail);
        assert_eq!(r.scenarios[1].outcome, Outcome::NoResult);
    }

    #[test]
    fn measurements_and_info_are_collected() {
        let text = lines(&[
            r#"{"type":"plan","suite":"bench","kernel":"6.12","scenarios":["thp.64M"]}"#,
            r#"{"type":"info","key":"node0.cpus","value":"0-1"}"#,
            r#"{"type":"measure","mode":"thp","size":67108864,"metric":"floor.map","unit":"s","samples":[0.5,0.25]}"#,
            r#"{"type":"result","name":"thp.64M","status":"pass","secs":3}"#,
            r#"{"type":"done"}"#,
        ]);
        let r = Report::parse(&text);
        assert!(r.passed(), "{:?}", r.problems);
        assert_eq!(r.info, [("node0.cpus".to_string(), "0-1".to_string())]);
        assert_eq!(r.measurements.len(), 1);
        let m = &r.measurements[0];
        assert_eq!((m.mode.as_str(), m.size), ("thp", 64 << 20));
        assert_eq!((m.metric.as_str(), m.unit.as_str()), ("floor.map", "s"));
        assert_eq!(m.samples, [0.5, 0.25]);
        // A measure line with a field missing is a protocol problem.
        let r = Report::parse(&lines(&[
            r#"{"type":"measure","mode":"thp","metric":"x","unit":"s","samples":[]}"#,
        ]));
        assert!(
            r.problems.iter().any(|p| p.contains("line 1")),
            "{:?}",
            r.problems
        );
    }

    #[test]
    fn an_empty_plan_is_not_a_pass() {
        let r = Report::parse(&lines(&[
            r#"{"type":"plan","suite":"x","kernel":"k","scenarios":[]}"#,
            r#"{"type":"done"}"#,
        ]));
        assert!(!r.passed());
    }
}
