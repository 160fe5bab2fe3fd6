//! Scenario files through the CLI: every shipped scenario passes, a broken
//! expectation exits 1 naming the step, invalid files exit 2 naming the
//! key, and the JSON lines carry exactly the documented keys.

mod common;

use common::{outcome, run_cli, temp_file};

const STEP_KEYS: [&str; 13] = [
    "step",
    "op",
    "model",
    "result",
    "evicted",
    "resident",
    "used",
    "free",
    "ms",
    "card_free",
    "gpu",
    "gpus",
    "parked",
];

fn scenario_files() -> Vec<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/scenarios");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_shipped_scenario_passes() {
    let files = scenario_files();
    assert!(
        files.len() >= 12,
        "the policy scenarios are all there: {files:?}"
    );
    for file in files {
        let (code, out, err) = outcome(&run_cli(
            &["scenario", file.to_str().unwrap(), "--json"],
            &[],
        ));
        assert_eq!(code, 0, "{}:\n{out}\n{err}", file.display());
        let last = out.lines().last().unwrap();
        let summary: serde_json::Value = serde_json::from_str(last).unwrap();
        assert_eq!(summary["summary"]["failed"], 0, "{}", file.display());
        assert!(summary["summary"]["steps"].as_u64().unwrap() > 0);
    }
}

#[test]
fn json_lines_have_exactly_the_documented_keys() {
    let (code, out, _) = outcome(&run_cli(
        &["scenario", "config/scenarios/trim.toml", "--json"],
        &[],
    ));
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    for line in &lines[..lines.len() - 1] {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut expected = STEP_KEYS.to_vec();
        expected.sort();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(sorted, expected, "{line}");
        // Key order follows the documentation too.
        assert!(line.starts_with("{\"step\":"), "{line}");
        assert!(
            v["used"].is_u64() && v["free"].is_u64() && v["ms"].is_f64(),
            "{line}"
        );
    }
    let step4: serde_json::Value = serde_json::from_str(lines[3]).unwrap();
    assert_eq!(step4["evicted"], serde_json::json!(["llm-big"]));
    assert_eq!(step4["free"], 0);
    assert_eq!(step4["used"], 16u64 << 30);
    let expected = format!(
        "{{\"summary\":{{\"steps\":4,\"failed\":0,\"peak\":{},\"overcommitted\":false,\"external_peak\":0}}}}",
        16u64 << 30
    );
    assert_eq!(lines.last().unwrap(), &expected);
}

#[test]
fn cargo_run_default_runs_the_voice_assistant_day() {
    let (code, out, err) = outcome(&run_cli(&[], &[]));
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("whisper-large-v3") && out.contains("0 failed"),
        "{out}"
    );
    assert!(out.contains("evicted"), "{out}");
}

const BROKEN: &str = r#"
[[models]]
id = "a"
kind = "llm"
vram = "10GiB"
[[models]]
id = "b"
kind = "llm"
vram = "10GiB"

[[steps]]
op = "load"
model = "a"

[[steps]]
op = "load"
model = "b"
evicted = ["a"]
resident = ["a"]
"#;

#[test]
fn a_failed_expectation_exits_1_naming_the_step() {
    let path = temp_file("broken.toml", BROKEN);
    let (code, out, err) = outcome(&run_cli(&["scenario", path.to_str().unwrap()], &[]));
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("step 2") && err.contains("resident"), "{err}");
    assert!(out.contains("1 failed"), "{out}");
    let (code, out, _) = outcome(&run_cli(
        &["scenario", path.to_str().unwrap(), "--json"],
        &[],
    ));
    assert_eq!(code, 1);
    assert!(
        out.contains("{\"summary\":{\"steps\":2,\"failed\":1,"),
        "{out}"
    );
}

#[test]
fn the_adaptive_scenario_fails_under_the_strict_order() {
    // The same day under the strict order evicts the LLM for the voice:
    // the adaptive scenario's expectations are not met.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("config/scenarios/adaptive.toml")).unwrap();
    assert!(text.contains("order = \"adaptive\""));
    let strict = text.replace("order = \"adaptive\"", "order = \"strict\"");
    let path = temp_file("adaptive-as-strict.toml", &strict);
    let (code, out, err) = outcome(&run_cli(
        &["scenario", path.to_str().unwrap(), "--json"],
        &[],
    ));
    assert_eq!(code, 1, "{out}\n{err}");
    let step6: serde_json::Value = serde_json::from_str(out.lines().nth(5).unwrap()).unwrap();
    assert_eq!(step6["model"], "voice-b");
    assert_eq!(step6["evicted"], serde_json::json!(["qwen2.5-14b"]));
}

#[test]
fn a_wrong_expected_code_fails_the_step() {
    let text = "[[models]]\nid = \"a\"\nkind = \"llm\"\nvram = \"1GiB\"\n[[steps]]\nop = \"load\"\nmodel = \"a\"\nexpect = \"insufficient_vram\"\n";
    let path = temp_file("wrong-code.toml", text);
    let (code, _, err) = outcome(&run_cli(&["scenario", path.to_str().unwrap()], &[]));
    assert_eq!(code, 1);
    assert!(
        err.contains("step 1") && err.contains("expected result insufficient_vram, got ok"),
        "{err}"
    );
}

#[test]
fn invalid_scenarios_exit_2_naming_the_problem() {
    let cases = [
        (
            "op.toml",
            "[[steps]]\nop = \"lod\"\nmodel = \"a\"\n",
            "steps[0].op",
        ),
        (
            "key.toml",
            "[[steps]]\nop = \"load\"\nmodel = \"a\"\nmodle = \"b\"\n",
            "modle",
        ),
        (
            "size.toml",
            "[[steps]]\nop = \"load\"\nmodel = \"a\"\nfree = \"12\"\n",
            "steps[0].free",
        ),
        (
            "model-size.toml",
            "[[models]]\nid = \"a\"\nkind = \"llm\"\nvram = \"12\"\n",
            "models[0].vram",
        ),
        (
            "expect.toml",
            "[[steps]]\nop = \"load\"\nmodel = \"a\"\nexpect = \"oops\"\n",
            "steps[0].expect",
        ),
        ("needs.toml", "[[steps]]\nop = \"sleep\"\n", "steps[0].ms"),
        (
            "applies.toml",
            "[[steps]]\nop = \"sleep\"\nms = 1\nmodel = \"a\"\n",
            "steps[0].model",
        ),
        (
            "release.toml",
            "[[steps]]\nop = \"release\"\nlease = \"x\"\n",
            "steps[0].lease",
        ),
        (
            "crash.toml",
            "[[steps]]\nop = \"crash\"\nkind = \"gpu\"\n",
            "steps[0].kind",
        ),
        ("toml.toml", "[[steps]\n", "line 1"),
    ];
    for (name, text, expected) in cases {
        let path = temp_file(name, text);
        let (code, out, err) = outcome(&run_cli(&["scenario", path.to_str().unwrap()], &[]));
        assert_eq!(code, 2, "{name}: {out}\n{err}");
        assert!(err.contains(expected), "{name}: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
    }
}

#[test]
fn a_plot_of_two_cards_has_a_panel_for_each() {
    let out = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{}-two.svg", std::process::id()));
    let (code, _, err) = outcome(&run_cli(
        &[
            "scenario",
            "config/scenarios/two-cards.toml",
            "--plot",
            out.to_str().unwrap(),
        ],
        &[],
    ));
    assert_eq!(code, 0, "{err}");
    let svg = std::fs::read_to_string(&out).unwrap();
    let doc = roxmltree::Document::parse(&svg).expect("well-formed XML");
    let texts: Vec<&str> = doc.descendants().filter_map(|n| n.text()).collect();
    for panel in ["(gpu 0)", "(gpu 1)"] {
        assert!(
            texts.iter().any(|t| t.contains(panel)),
            "a caption {panel}: {texts:?}"
        );
    }
    // Each panel has its own capacity line.
    assert!(
        texts.iter().any(|t| t.contains("capacity 16.0 GiB")),
        "{texts:?}"
    );
    assert!(
        texts.iter().any(|t| t.contains("capacity 12.0 GiB")),
        "{texts:?}"
    );
}

#[test]
fn the_two_cards_scenario_reports_each_card() {
    let (code, out, err) = outcome(&run_cli(
        &["scenario", "config/scenarios/two-cards.toml", "--json"],
        &[],
    ));
    assert_eq!(code, 0, "{err}");
    let steps: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v.get("step").is_some())
        .collect();
    for step in &steps {
        let gpus = step["gpus"].as_array().unwrap();
        assert_eq!(gpus.len(), 2);
        // The totals are the sums over the cards.
        let used: u64 = gpus.iter().map(|g| g["used"].as_u64().unwrap()).sum();
        let free: u64 = gpus.iter().map(|g| g["free"].as_u64().unwrap()).sum();
        assert_eq!(
            (step["used"].as_u64(), step["free"].as_u64()),
            (Some(used), Some(free))
        );
    }
    assert_eq!(steps[0]["gpu"], 1, "whisper may only use card 1");
    assert_eq!(steps[7]["result"], "exceeds_capacity");
    assert!(steps[7]["gpu"].is_null(), "on no card: {}", steps[7]);
}

#[test]
fn plot_writes_a_valid_svg_naming_every_model() {
    let out = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{}-va.svg", std::process::id()));
    let (code, _, err) = outcome(&run_cli(
        &[
            "scenario",
            "config/scenarios/voice-assistant.toml",
            "--plot",
            out.to_str().unwrap(),
        ],
        &[],
    ));
    assert_eq!(code, 0, "{err}");
    let svg = std::fs::read_to_string(&out).unwrap();
    let doc = roxmltree::Document::parse(&svg).expect("well-formed XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let texts: Vec<&str> = doc.descendants().filter_map(|n| n.text()).collect();
    for model in [
        "whisper-large-v3",
        "kokoro-82m",
        "llama-3.1-8b-q4_k_m",
        "qwen2.5-14b-q5_k_m",
    ] {
        assert!(texts.iter().any(|t| t.contains(model)), "{model} is named");
    }
    assert!(texts.iter().any(|t| t.contains("capacity 16.0 GiB")));
    assert!(
        texts
            .iter()
            .any(|t| t.contains("evicted llama-3.1-8b-q4_k_m, kokoro-82m"))
    );
    assert!(
        texts.iter().any(|t| t.contains("insufficient_vram")),
        "the failure is labelled"
    );
    // Four model bands plus the capacity line are in the legend; bands are
    // filled rectangles.
    let rects = doc.descendants().filter(|n| n.has_tag_name("rect")).count();
    assert!(rects > 40, "one rectangle per model per step: {rects}");
}

#[test]
fn plot_to_an_unwritable_path_exits_2_naming_it() {
    let (code, _, err) = outcome(&run_cli(
        &[
            "scenario",
            "config/scenarios/trim.toml",
            "--plot",
            "/nonexistent/dir/out.svg",
        ],
        &[],
    ));
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/dir/out.svg"), "{err}");
}

/// A scenario of `n` load steps alternating between two LLMs that do not
/// fit together (every step evicts).
fn long_scenario(n: usize) -> String {
    let mut text = String::from(
        "[gpu]\ntotal = \"16GiB\"\n\
         [[models]]\nid = \"a\"\nkind = \"llm\"\nvram = \"10GiB\"\n\
         [[models]]\nid = \"b\"\nkind = \"llm\"\nvram = \"10GiB\"\n",
    );
    for i in 0..n {
        let model = if i % 2 == 0 { "a" } else { "b" };
        text.push_str(&format!("[[steps]]\nop = \"load\"\nmodel = \"{model}\"\n"));
    }
    text
}

#[test]
fn a_closed_pipe_ends_the_run_quietly() {
    use std::io::{BufRead, BufReader};
    // Far more output than a pipe holds, so the writer meets the closed end.
    let path = temp_file("long.toml", &long_scenario(20_000));
    for json in [true, false] {
        let mut args = vec!["scenario", path.to_str().unwrap()];
        if json {
            args.push("--json");
        }
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vram-manager"))
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        // The reader goes away after one line, as `| head -1` does.
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!first.is_empty());
        assert_eq!(out.status.code(), Some(0), "json {json}: {err}");
        assert!(
            !err.contains("panic") && !err.contains("ERROR") && !err.contains("Broken pipe"),
            "json {json}: {err}"
        );
    }
}

#[test]
fn other_processes_use_is_not_over_committing() {
    // Other processes take more than the card (its total is set too low);
    // the 10 GiB model is refused by the planner (it never asks the card),
    // so nothing over-commits.
    let path = temp_file(
        "external.toml",
        "[gpu]\ntotal = \"16GiB\"\n\
         [[models]]\nid = \"a\"\nkind = \"llm\"\nvram = \"10GiB\"\n\
         [[steps]]\nop = \"external\"\nvram = \"17GiB\"\n\
         [[steps]]\nop = \"load\"\nmodel = \"a\"\nexpect = \"insufficient_vram\"\n\
         [[steps]]\nop = \"external\"\nvram = \"1GiB\"\n",
    );
    let (code, out, err) = outcome(&run_cli(
        &["scenario", path.to_str().unwrap(), "--json"],
        &[],
    ));
    assert_eq!(code, 0, "{out}\n{err}");
    let summary: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(summary["summary"]["overcommitted"], false, "{out}");
    assert_eq!(summary["summary"]["external_peak"], 17u64 << 30, "{out}");
}

#[test]
fn the_most_other_processes_can_hold_does_not_wrap_the_card() {
    let path = temp_file(
        "external-max.toml",
        "[gpu]\ntotal = \"16GiB\"\nexternal = \"18446744073709551615B\"\n\
         [[models]]\nid = \"a\"\nkind = \"llm\"\nvram = \"8GiB\"\n\
         [[steps]]\nop = \"load\"\nmodel = \"a\"\nexpect = \"insufficient_vram\"\nresident = []\n",
    );
    let (code, out, err) = outcome(&run_cli(
        &["scenario", path.to_str().unwrap(), "--json"],
        &[],
    ));
    assert_eq!(code, 0, "{out}\n{err}");
    let step: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(step["card_free"], 0, "{out}");
    let summary: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(summary["summary"]["overcommitted"], false, "{out}");
    assert_eq!(summary["summary"]["external_peak"], u64::MAX, "{out}");
}

#[test]
fn sizes_near_two_to_the_64_add_up_without_a_panic() {
    // Loading b reserves 10 EiB beside a's 8: the ledger briefly holds more
    // than 2^64 - 1 bytes, and must not lose count of them.
    let path = temp_file(
        "huge.toml",
        "[gpu]\ntotal = \"18446744073709551615B\"\n\
         [[models]]\nid = \"a\"\nkind = \"llm\"\nvram = \"8EiB\"\n\
         [[models]]\nid = \"b\"\nkind = \"llm\"\nvram = \"10EiB\"\n\
         [[steps]]\nop = \"load\"\nmodel = \"a\"\n\
         [[steps]]\nop = \"load\"\nmodel = \"b\"\nevicted = [\"a\"]\nresident = [\"b\"]\nfree = \"6917529027641081855B\"\n",
    );
    let (code, out, err) = outcome(&run_cli(&["scenario", path.to_str().unwrap()], &[]));
    assert_eq!(code, 0, "{out}\n{err}");
}

/// A stderr that cannot be written (`2>/dev/full`, or a pipe its reader
/// closed) loses the messages, not the exit status: bad input still exits
/// 2, and a run with logs (a crash step logs its panic) still exits 0.
#[test]
fn an_unwritable_stderr_changes_no_exit_status() {
    let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
        eprintln!("skipped: this system has no /dev/full");
        return;
    };
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_vram-manager"))
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(full.try_clone().unwrap())
            .status()
            .expect("the binary runs")
            .code()
    };
    assert_eq!(run(&["scenario", "/nonexistent/scenario.toml"]), Some(2));
    assert_eq!(
        run(&["scenario", "config/scenarios/crash-restart.toml"]),
        Some(0)
    );
    assert_eq!(
        run(&["check-config", "/nonexistent/settings.toml"]),
        Some(2)
    );
}

/// A lease name acquired again while held holds a second lease: one
/// release leaves the model leased (a load that needs its room is
/// refused), the second frees it.
#[test]
fn a_lease_name_acquired_twice_takes_two_releases() {
    let path = temp_file(
        "lease-twice.toml",
        r#"
[policy]
lease_wait = "0s"

[[models]]
id = "llm-a"
kind = "llm"
vram = "10GiB"
[[models]]
id = "llm-b"
kind = "llm"
vram = "10GiB"

[[steps]]
op = "acquire"
model = "llm-a"
[[steps]]
op = "acquire"
model = "llm-a"
[[steps]]
op = "release"
lease = "llm-a"
[[steps]]
op = "load"
model = "llm-b"
expect = "insufficient_vram"
resident = ["llm-a"]
[[steps]]
op = "release"
lease = "llm-a"
[[steps]]
op = "load"
model = "llm-b"
evicted = ["llm-a"]
"#,
    );
    let (code, stdout, stderr) = outcome(&run_cli(&["scenario", path.to_str().unwrap()], &[]));
    assert_eq!(code, 0, "{stdout}\n{stderr}");
}

/// A scenario runs on simulated cards, each sized by its total: a total of
/// "auto" (read from a real card) is refused when the file is read, before
/// any line of output, by `scenario` and `check-config` alike.
#[test]
fn a_card_total_of_auto_is_refused_in_a_scenario_before_any_output() {
    let path = temp_file(
        "auto-total.toml",
        "[gpu]\ntotal = \"auto\"\ndevice = \"GPU-00000000-none\"\n[[steps]]\nop = \"sleep\"\nms = 1\n",
    );
    for command in ["scenario", "check-config"] {
        let (code, out, err) = outcome(&run_cli(&[command, path.to_str().unwrap()], &[]));
        assert_eq!(code, 2, "{command}: {out}\n{err}");
        assert_eq!(out, "", "{command}: {err}");
        assert!(
            err.contains("gpu.total") && err.contains("simulated card"),
            "{command}: {err}"
        );
    }
}
