//! Every example runs (in a short mode where it has one) and succeeds:
//! examples are part of the product. `cargo test` builds them beside the
//! test binaries.

use std::path::PathBuf;
use std::process::Command;

/// The built example `name` (target/<profile>/examples/<name>).
fn example(name: &str) -> PathBuf {
    let me = std::env::current_exe().expect("the test binary has a path");
    let profile = me
        .parent()
        .and_then(|deps| deps.parent())
        .expect("tests live in target/<profile>/deps");
    profile.join("examples").join(name)
}

/// Runs an example; answers its standard output, failing on a non-zero
/// exit.
fn run(name: &str, args: &[&str]) -> String {
    let output = Command::new(example(name))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| panic!("example {name} runs: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "example {name} failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn the_voice_assistant_completes_every_turn() {
    let out = run("voice_assistant", &[]);
    assert!(out.contains("5 of 5 turns completed"), "{out}");
}

#[test]
fn the_supervised_restart_tour_succeeds() {
    run("supervised_restart", &[]);
}

#[test]
fn a_short_soak_finds_no_violation() {
    let out = run("soak", &["--ops", "3000"]);
    assert!(out.contains("violations     0"), "{out}");
}

#[test]
fn a_short_soak_under_the_adaptive_order_finds_no_violation() {
    let out = run(
        "soak",
        &["--ops", "3000", "--order", "adaptive", "--seed", "5"],
    );
    assert!(out.contains("violations     0"), "{out}");
    assert!(!out.contains("checks         0\n"), "{out}");
}

#[test]
fn the_quick_policy_study_puts_adaptive_nearest_the_optimum() {
    let out = run("policy_study", &["--quick"]);
    let mean = |policy: &str| -> f64 {
        let line = out
            .lines()
            .find(|l| l.starts_with(policy) && l.contains("mean over all"))
            .unwrap_or_else(|| panic!("a mean for {policy}: {out}"));
        let figure = line.split(": ").nth(1).and_then(|f| f.split('x').next());
        figure
            .and_then(|f| f.parse().ok())
            .unwrap_or_else(|| panic!("{line}"))
    };
    let (strict, lru, adaptive) = (mean("strict"), mean("lru"), mean("adaptive"));
    // Seeded traces: these figures are the same on every machine.
    assert!(adaptive >= 1.0 && strict >= 1.0 && lru >= 1.0, "{out}");
    assert!(adaptive < lru && adaptive < strict, "{out}");
    assert!(
        adaptive <= 1.10,
        "adaptive {adaptive} over its target: {out}"
    );
    assert!(out.contains("refused requests: 0"), "{out}");
}

#[test]
fn the_quick_bench_prints_its_figures() {
    let out = run("bench", &["--quick", "--json"]);
    let figures: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    for key in [
        "acquire_ratio",
        "load_k1_ratio",
        "load_k4_ratio",
        "load_k16_ratio",
    ] {
        assert!(
            figures[key].as_f64().is_some_and(|r| r > 0.0),
            "{key}: {out}"
        );
    }
}

#[test]
fn the_proxy_bench_measures_both_ways() {
    let out = run(
        "proxy_bench",
        &[
            "--clients",
            "4",
            "--requests",
            "40",
            "--rounds",
            "1",
            "--rate",
            "400",
            "--json",
        ],
    );
    let figures: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    for mode in ["saturated", "paced"] {
        assert_eq!(figures[mode]["requests"], 40, "{out}");
        for key in ["direct_rps", "proxied_rps", "proxied_p99_ms"] {
            assert!(
                figures[mode][key].as_f64().is_some_and(|v| v > 0.0),
                "{mode}.{key}: {out}"
            );
        }
    }
    // Paced at 400 a second, 40 requests take about 0.1 s: far below what
    // either path can do when saturated.
    assert_eq!(figures["paced"]["rate"], 400, "{out}");
}

#[test]
fn the_quick_swap_silence_day_measures_every_setup() {
    let out = run("swap_silence", &["--quick"]);
    let waited = |setup: &str| -> f64 {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("| {setup} |")))
            .unwrap_or_else(|| panic!("a row for {setup}: {out}"));
        line.split('|')
            .nth(2)
            .and_then(|c| c.trim().parse().ok())
            .unwrap_or_else(|| panic!("{line}"))
    };
    let cold = waited("stop-only, cold");
    // A virtual clock: these figures are the same on every machine.
    assert!(cold > 0.0, "{out}");
    assert!(waited("warming") < cold, "{out}");
    assert!(waited("parking") < cold, "{out}");
    assert!(waited("warming + parking") < cold, "{out}");
    assert!(out.contains("manager overhead per swap"), "{out}");
}
