//! Settings: layering (defaults, file, VRAM__* environment), validation
//! messages that name the key, and the `check-config` command's exits.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{GIB, outcome, run_cli, temp_file};
use vram_manager::config::{GpuTotal, ProbeChoice, Settings, SettingsError};

fn error_of(text: &str) -> String {
    Settings::parse(text)
        .expect_err("settings should be refused")
        .to_string()
}

#[test]
fn defaults_are_the_voice_assistant_on_16_gib() {
    let s = Settings::parse("").unwrap();
    assert_eq!(s.capacity(), Some(16 * GIB));
    assert_eq!(s.gpu.probe, ProbeChoice::Auto);
    assert_eq!(s.policy.lease_wait, Duration::ZERO);
    assert_eq!(s.policy.max_queue, 64);
    let asr = s.kinds.get("asr").unwrap();
    assert!(asr.protected && asr.priority == 2);
    assert_eq!(s.kinds.get("llm").unwrap().priority, 0);
    assert!(s.models.is_empty());
}

#[test]
fn the_eviction_order_is_strict_unless_set() {
    assert_eq!(
        Settings::parse("").unwrap().policy.order,
        vram_manager::Order::Strict
    );
    let s = Settings::parse("[policy]\norder = \"adaptive\"\n").unwrap();
    assert_eq!(s.policy.order, vram_manager::Order::Adaptive);
    let e = error_of("[policy]\norder = \"lru\"\n");
    assert!(e.contains("policy.order") && e.contains("\"lru\""), "{e}");
    assert!(e.contains("strict") && e.contains("adaptive"), "{e}");
}

#[test]
fn a_file_layers_over_the_defaults() {
    let s = Settings::parse(
        r#"
        [gpu]
        total = "24GiB"
        reserve = "1GiB"
        [policy]
        lease_wait = "250ms"
        [kinds.vad]
        priority = 3
        protected = true
        [[models]]
        id = "whisper"
        kind = "asr"
        vram = "3GiB"
        pinned = true
        "#,
    )
    .unwrap();
    assert_eq!(s.capacity(), Some(23 * GIB));
    assert_eq!(s.policy.lease_wait, Duration::from_millis(250));
    assert_eq!(
        s.policy.unload_timeout,
        Duration::from_secs(30),
        "untouched default"
    );
    assert_eq!(s.kinds.len(), 4, "a new kind joins the defaults");
    let m = s.model("whisper").unwrap();
    assert_eq!((m.spec.bytes, m.spec.pinned), (3 * GIB, true));
}

#[test]
fn environment_layers_over_the_file() {
    let env: HashMap<String, String> = [
        ("VRAM__GPU__TOTAL", "24GiB"),
        ("VRAM__POLICY__LEASE_WAIT", "2s"),
        ("VRAM__GPU__DEVICE", "1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let file = "[gpu]\ntotal = \"8GiB\"\n";
    let s = Settings::from_layers(Some(("file", file)), Some(env)).unwrap();
    assert_eq!(s.gpu.total, GpuTotal::Bytes(24 * GIB));
    assert_eq!(s.gpu.device, "1");
    assert_eq!(s.policy.lease_wait, Duration::from_secs(2));
}

#[test]
fn total_auto_is_accepted() {
    let s = Settings::parse("[gpu]\ntotal = \"auto\"\n").unwrap();
    assert_eq!(s.gpu.total, GpuTotal::Auto);
    assert_eq!(s.capacity(), None);
}

#[test]
fn unknown_kind_names_the_kind_and_the_key() {
    let e = error_of("[[models]]\nid = \"a\"\nkind = \"stt\"\nvram = \"1GiB\"\n");
    assert!(e.contains("models[0].kind") && e.contains("\"stt\""), "{e}");
}

#[test]
fn size_without_unit_names_the_field() {
    for vram in ["\"3\"", "3"] {
        let e = error_of(&format!(
            "[[models]]\nid = \"a\"\nkind = \"asr\"\nvram = {vram}\n"
        ));
        assert!(e.contains("models[0].vram") && e.contains("no unit"), "{e}");
    }
    let e = error_of("[gpu]\nreserve = \"lots\"\n");
    assert!(e.contains("gpu.reserve"), "{e}");
}

#[test]
fn duplicate_model_id_says_duplicate_and_the_id() {
    let model = "[[models]]\nid = \"twin\"\nkind = \"tts\"\nvram = \"1GiB\"\n";
    let e = error_of(&format!("{model}{model}"));
    assert!(
        e.contains("duplicate") && e.contains("\"twin\"") && e.contains("models[1].id"),
        "{e}"
    );
}

#[test]
fn not_toml_gives_line_and_column() {
    let err = Settings::parse("[gpu]\ntotal = \n").unwrap_err();
    assert!(matches!(err, SettingsError::Toml { .. }));
    let e = err.to_string();
    assert!(e.contains("line 2") && e.contains("column"), "{e}");
}

#[test]
fn unknown_keys_and_wrong_types_name_the_key() {
    let e = error_of("[[models]]\nid = \"a\"\nkind = \"asr\"\nvram = \"1GiB\"\nvrm = 2\n");
    assert!(e.contains("vrm") && e.contains("models[0]"), "{e}");
    let e = error_of("[kinds.llm]\npriority = \"low\"\n");
    assert!(e.contains("kinds.llm.priority"), "{e}");
    let e = error_of("[policy]\nlease_wait = \"soon\"\n");
    assert!(e.contains("policy.lease_wait"), "{e}");
    let e = error_of("[gpu]\nprobe = \"cuda\"\n");
    assert!(e.contains("gpu.probe") && e.contains("cuda"), "{e}");
    let e = error_of("[gpu]\ntotal = \"4GiB\"\nreserve = \"4GiB\"\n");
    assert!(e.contains("gpu.reserve"), "{e}");
}

#[test]
fn a_model_larger_than_the_card_is_legal() {
    let s =
        Settings::parse("[[models]]\nid = \"big\"\nkind = \"llm\"\nvram = \"40GiB\"\n").unwrap();
    assert_eq!(s.model("big").unwrap().spec.bytes, 40 * GIB);
}

#[test]
fn check_config_prints_the_effective_settings() {
    let (code, out, _) = outcome(&run_cli(&["check-config", "config/default.toml"], &[]));
    assert_eq!(code, 0);
    assert!(
        out.contains("capacity 16.0 GiB (17179869184 bytes)"),
        "{out}"
    );
    assert!(out.contains("asr") && out.contains("protected"), "{out}");
}

#[test]
fn check_config_warns_about_a_model_larger_than_the_card() {
    let path = temp_file(
        "big.toml",
        "[[models]]\nid = \"big\"\nkind = \"llm\"\nvram = \"40GiB\"\n",
    );
    let (code, out, err) = outcome(&run_cli(&["check-config", path.to_str().unwrap()], &[]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("big"));
    assert!(
        err.contains("warning") && err.contains("\"big\"") && err.contains("exceeds_capacity"),
        "{err}"
    );
}

#[test]
fn check_config_exits_2_naming_what_was_wrong() {
    let cases = [
        (
            "kind.toml",
            "[[models]]\nid = \"a\"\nkind = \"stt\"\nvram = \"1GiB\"\n",
            "\"stt\"",
        ),
        (
            "unit.toml",
            "[[models]]\nid = \"a\"\nkind = \"asr\"\nvram = \"3\"\n",
            "models[0].vram",
        ),
        (
            "dup.toml",
            "[[models]]\nid = \"a\"\nkind = \"asr\"\nvram = \"1GiB\"\n[[models]]\nid = \"a\"\nkind = \"tts\"\nvram = \"1GiB\"\n",
            "duplicate model id \"a\"",
        ),
        ("toml.toml", "[gpu\n", "line 1, column"),
        (
            "control.toml",
            "[[models]]\nid = \"\\u0007bell\"\nkind = \"asr\"\nvram = \"1GiB\"\n",
            "models[0].id: \"\\u{7}bell\" holds a control character",
        ),
    ];
    for (name, text, expected) in cases {
        let path = temp_file(name, text);
        let (code, _, err) = outcome(&run_cli(&["check-config", path.to_str().unwrap()], &[]));
        assert_eq!(code, 2, "{name}: {err}");
        assert!(err.contains(expected), "{name}: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
    }
}

#[test]
fn check_config_reads_the_environment() {
    let (code, _, err) = outcome(&run_cli(&["check-config"], &[("VRAM__GPU__TOTAL", "lots")]));
    assert_eq!(code, 2);
    assert!(err.contains("gpu.total"), "{err}");
    let (code, out, _) = outcome(&run_cli(
        &["check-config"],
        &[("VRAM__GPU__TOTAL", "24GiB")],
    ));
    assert_eq!(code, 0);
    assert!(out.contains("24.0 GiB"), "{out}");
}

#[test]
fn a_missing_file_exits_2_naming_it() {
    let (code, _, err) = outcome(&run_cli(&["check-config", "no/such/file.toml"], &[]));
    assert_eq!(code, 2);
    assert!(err.contains("no/such/file.toml"), "{err}");
}

#[test]
fn a_ready_timeout_must_be_shorter_than_the_load_timeout() {
    let process = "[[models]]\nid = \"s\"\nkind = \"llm\"\nvram = \"1GiB\"\nbackend = \"process\"\ncommand = [\"srv\"]\nready = \"tcp://127.0.0.1:9\"\n";
    let e = error_of(&format!("{process}ready_timeout = \"120s\"\n"));
    assert!(
        e.contains("models[0].ready_timeout") && e.contains("policy.load_timeout (2m)"),
        "{e}"
    );
    // The default (process.ready_timeout) fits the default load_timeout.
    assert!(Settings::parse(process).is_ok());
}

#[test]
fn the_unload_timeout_must_cover_a_stop() {
    let process = "[[models]]\nid = \"s\"\nkind = \"llm\"\nvram = \"1GiB\"\nbackend = \"process\"\ncommand = [\"srv\"]\nready = \"tcp://127.0.0.1:9\"\n";
    let e = error_of(&format!(
        "{process}stop_timeout = \"15s\"\nstop = [\"docker\", \"stop\", \"s\"]\n"
    ));
    assert!(
        e.contains("policy.unload_timeout") && e.contains("35s") && e.contains("\"s\""),
        "{e}"
    );
    assert!(Settings::parse(&format!("{process}stop_timeout = \"15s\"\n")).is_ok());
}

/// A settings file with one model whose extra keys are `extra`.
fn one_model(extra: &str) -> String {
    format!("[[models]]\nid = \"a\"\nkind = \"llm\"\nvram = \"1GiB\"\n{extra}\n")
}

#[test]
fn every_value_is_checked_where_it_enters_naming_its_key() {
    // (settings text, the key the error must name, a word it must say)
    let cases = [
        (
            "[policy]\nlease_wait = \"500000000000y\"\n".to_string(),
            "policy.lease_wait",
            "100 years",
        ),
        (
            "[kinds.llm]\npriority = 65536\n".to_string(),
            "kinds.llm.priority",
            "65535",
        ),
        (
            "[kinds.llm]\npriority = 1.9\n".to_string(),
            "kinds.llm.priority",
            "line 2",
        ),
        (
            "[kinds.llm]\npriority = true\n".to_string(),
            "kinds.llm.priority",
            "boolean",
        ),
        (
            "[gpu]\ntotal = \"18446744073709551616B\"\n".to_string(),
            "gpu.total",
            "2^64",
        ),
        (
            "[gpu]\ntotal = \"100000000000TiB\"\n".to_string(),
            "gpu.total",
            "2^64",
        ),
        (
            "[gpu]\ntotal = \"0B\"\n".to_string(),
            "gpu.total",
            "0 bytes",
        ),
        (
            "[gpu]\nrelease_poll = \"0s\"\n".to_string(),
            "gpu.release_poll",
            "1ms",
        ),
        (one_model("pinned = 2"), "models[0].pinned", "line 5"),
        (one_model("pinned = \"on\""), "models[0].pinned", "boolean"),
        (
            "[policy]\nmax_queue = 1.5\n".to_string(),
            "policy.max_queue",
            "line 2",
        ),
        (
            "[[models]]\nid = true\nkind = \"llm\"\nvram = \"1GiB\"\n".to_string(),
            "models[0].id",
            "line 2",
        ),
        (
            "[kinds.llm]\nttl = \"0s\"\n".to_string() + &one_model(""),
            "kinds.llm.ttl",
            "0s",
        ),
        (one_model("ttl = \"200y\""), "models[0].ttl", "100 years"),
    ];
    for (text, key, word) in cases {
        let e = error_of(&text);
        assert!(e.contains(key), "{text}\n-> {e} (should name {key})");
        assert!(e.contains(word), "{text}\n-> {e} (should say {word})");
    }
}

#[test]
fn the_largest_sizes_are_exact() {
    let s = Settings::parse("[gpu]\ntotal = \"18446744073709551615B\"\nreserve = \"6.5GiB\"\n")
        .unwrap();
    assert_eq!(s.gpu.total, GpuTotal::Bytes(u64::MAX));
    assert_eq!(s.gpu.reserve, 6 * GIB + GIB / 2);
}

#[test]
fn check_config_reads_a_scenario_file_with_its_steps() {
    let path = "config/scenarios/lru.toml";
    let steps = vram_manager::scenario::Scenario::load(std::path::Path::new(path))
        .unwrap()
        .steps
        .len();
    let (code, out, err) = outcome(&run_cli(&["check-config", path], &[]));
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains(&format!("scenario: {steps} steps")), "{out}");
    // A bad step is named with its number and line.
    let bad = temp_file(
        "bad-step.toml",
        "[[models]]\nid = \"a\"\nkind = \"llm\"\nvram = \"1GiB\"\n\
         [[steps]]\nop = \"load\"\nmodel = \"a\"\n\
         [[steps]]\nop = \"sleep\"\nms = \"5s\"\n",
    );
    let (code, _, err) = outcome(&run_cli(&["check-config", bad.to_str().unwrap()], &[]));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("steps[1].ms") && err.contains("line 10"),
        "{err}"
    );
}

#[test]
fn a_missing_working_directory_is_named_as_cwd() {
    let path = temp_file(
        "cwd.toml",
        &one_model(
            "backend = \"process\"\ncommand = [\"true\"]\nready = \"tcp://127.0.0.1:1\"\ncwd = \"/no/such/dir\"",
        ),
    );
    let (code, out, err) = outcome(&run_cli(&["check-config", path.to_str().unwrap()], &[]));
    // It may exist where the config is deployed: a warning, naming it.
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains("models[0].cwd") && err.contains("/no/such/dir"),
        "{err}"
    );
    // A load fails naming it too, not the command.
    let scenario = format!(
        "{}[[steps]]\nop = \"load\"\nmodel = \"a\"\n",
        std::fs::read_to_string(&path).unwrap()
    );
    let path = temp_file("cwd-scenario.toml", &scenario);
    let (code, out, err) = outcome(&run_cli(&["scenario", path.to_str().unwrap()], &[]));
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        err.contains("backend_failed") && err.contains("cwd \"/no/such/dir\""),
        "{err}"
    );
}

#[test]
fn a_server_sees_its_card() {
    use vram_manager::config::BackendSpec;
    let s = Settings::parse(
        "[gpu]\nprobe = \"none\"\ndevice = \"GPU-1234\"\n\
         [[models]]\nid = \"a\"\nkind = \"llm\"\nvram = \"1GiB\"\nbackend = \"process\"\n\
         command = [\"server\", \"--device\", \"{gpu}\"]\nready = \"tcp://127.0.0.1:1\"\n\
         stop = [\"stop-on\", \"{gpu}\"]\ncwd = \"/tmp/{gpu}\"\nenv = { LOG = \"/var/log/{gpu}.log\" }\n\
         [[models]]\nid = \"b\"\nkind = \"llm\"\nvram = \"1GiB\"\nbackend = \"process\"\n\
         command = [\"server\"]\nready = \"tcp://127.0.0.1:2\"\nenv = { CUDA_VISIBLE_DEVICES = \"3\" }\n",
    )
    .unwrap();
    let BackendSpec::Process(a) = &s.models[0].backend else {
        panic!("a process model");
    };
    // As written until it is started on a card.
    assert_eq!(a.command, ["server", "--device", "{gpu}"]);
    assert!(!a.env.contains_key("CUDA_VISIBLE_DEVICES"));
    let a = a.on_device(&s.gpus[0].device);
    assert_eq!(a.command, ["server", "--device", "GPU-1234"]);
    assert_eq!(a.stop, ["stop-on", "GPU-1234"]);
    assert_eq!(
        a.cwd.as_deref(),
        Some(std::path::Path::new("/tmp/GPU-1234"))
    );
    assert_eq!(a.env["LOG"], "/var/log/GPU-1234.log");
    assert_eq!(a.env["CUDA_VISIBLE_DEVICES"], "GPU-1234");
    // A model that names its card itself keeps it.
    let BackendSpec::Process(b) = &s.models[1].backend else {
        panic!("a process model");
    };
    assert_eq!(b.on_device("GPU-1234").env["CUDA_VISIBLE_DEVICES"], "3");
}

#[test]
fn fractional_sizes_are_exact_to_the_byte() {
    let s = Settings::parse(
        "[gpu]\ntotal = \"9007199254740993.0B\"\nreserve = \"0.5KiB\"\nexternal = \"1.25GiB\"\n",
    )
    .unwrap();
    assert_eq!(s.gpu.total, GpuTotal::Bytes(9_007_199_254_740_993));
    assert_eq!(s.gpu.reserve, 512);
    assert_eq!(s.gpu.external, GIB + GIB / 4);
    // The bound is 100 years as humantime counts them: "100y" is fine.
    let s = Settings::parse("[policy]\nlease_wait = \"100y\"\n").unwrap();
    assert_eq!(s.policy.lease_wait, vram_manager::config::MAX_DURATION);
    for bad in [
        "1e3GiB",
        "-1GiB",
        "1.GiB",
        ".5GiB",
        "18446744073709551615.6B",
    ] {
        let e = error_of(&format!("[gpu]\ntotal = \"{bad}\"\n"));
        assert!(e.contains("gpu.total"), "{bad}: {e}");
    }
}

#[test]
fn environment_variables_are_held_to_the_same_types() {
    let with = |pairs: &[(&str, &str)]| {
        let env: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_layers(None, Some(env))
    };
    for (name, value) in [
        ("VRAM__KINDS__LLM__PRIORITY", "1.9"),
        ("VRAM__KINDS__LLM__PROTECTED", "on"),
        ("VRAM__POLICY__MAX_QUEUE", "1.5"),
    ] {
        let e = with(&[(name, value)]).unwrap_err().to_string();
        assert!(e.contains(name), "{name}={value}: {e}");
    }
    // Text where the key wants text, numbers and booleans where it wants them.
    let s = with(&[
        ("VRAM__GPU__DEVICE", "0"),
        ("VRAM__POLICY__MAX_QUEUE", "4"),
        ("VRAM__KINDS__ASR__PROTECTED", "false"),
        ("VRAM__GPU__RELEASE_FRACTION", "0.5"),
    ])
    .unwrap();
    assert_eq!(s.gpu.device, "0");
    assert_eq!(s.policy.max_queue, 4);
    assert!(!s.kinds.get("asr").unwrap().protected);
    assert_eq!(s.gpu.release_fraction, 0.5);
}

#[test]
fn a_field_only_the_other_backend_reads_is_refused_naming_it() {
    let process = "backend = \"process\"\ncommand = [\"server\"]\nready = \"tcp://127.0.0.1:9\"\n";
    let park = "[models.park]\nvram = \"100MiB\"\nhost = \"1GiB\"\n";
    // (extra keys of model "a", the key the error must name, the backend
    // that reads it)
    let cases = [
        (format!("{process}load_ms = 0"), "models[0].load_ms", "sim"),
        (
            format!("{process}fail_load = false"),
            "models[0].fail_load",
            "sim",
        ),
        (
            format!("{process}actual_vram = \"2GiB\""),
            "models[0].actual_vram",
            "sim",
        ),
        (
            format!("{process}release_ms = 5"),
            "models[0].release_ms",
            "sim",
        ),
        (
            format!(
                "{process}{park}sleep = \"http://127.0.0.1:9/s\"\nwake = \"http://127.0.0.1:9/w\"\nsleep_ms = 5"
            ),
            "models[0].park.sleep_ms",
            "sim",
        ),
        (
            format!("{process}warm_load_ms = 1"),
            "models[0].warm_load_ms",
            "sim",
        ),
        (
            format!("{process}unload_ms = 1"),
            "models[0].unload_ms",
            "sim",
        ),
        (
            format!(
                "{process}{park}sleep = \"http://127.0.0.1:9/s\"\nwake = \"http://127.0.0.1:9/w\"\nwake_ms = 5"
            ),
            "models[0].park.wake_ms",
            "sim",
        ),
        (
            "ready = \"tcp://127.0.0.1:9\"".to_string(),
            "models[0].ready",
            "process",
        ),
        (
            "command = [\"server\"]".to_string(),
            "models[0].command",
            "process",
        ),
        ("cwd = \"/tmp\"".to_string(), "models[0].cwd", "process"),
        (
            "ready_timeout = \"1s\"".to_string(),
            "models[0].ready_timeout",
            "process",
        ),
        (
            "stop = [\"docker\", \"stop\", \"a\"]".to_string(),
            "models[0].stop",
            "process",
        ),
        // Even empty: it says the model was meant to be a server.
        ("env = {}".to_string(), "models[0].env", "process"),
        (
            format!("{park}wake = \"http://127.0.0.1:9/w\""),
            "models[0].park.wake",
            "process",
        ),
        (
            "stop_timeout = \"1s\"".to_string(),
            "models[0].stop_timeout",
            "process",
        ),
        (
            "env = { CUDA_VISIBLE_DEVICES = \"0\" }".to_string(),
            "models[0].env",
            "process",
        ),
        (
            format!("{park}sleep = \"http://127.0.0.1:9/s\""),
            "models[0].park.sleep",
            "process",
        ),
    ];
    for (extra, key, owner) in cases {
        let text = one_model(&extra);
        let e = error_of(&text);
        assert!(e.contains(key), "{text}\n-> {e} (should name {key})");
        let says = format!("backend = \"{owner}\"");
        assert!(e.contains(&says), "{text}\n-> {e} (should say {says})");
    }
    // Each backend's own fields are accepted.
    Settings::parse(&one_model(&format!(
        "load_ms = 5\nunload_ms = 1\nrelease_ms = 2\nfail_load = false\n{park}sleep_ms = 1\nwake_ms = 2"
    )))
    .expect("a simulated model's own fields");
    Settings::parse(&one_model(&format!(
        "{process}stop_timeout = \"1s\"\nenv = {{ A = \"1\" }}\n{park}sleep = \"http://127.0.0.1:9/s\"\nwake = \"http://127.0.0.1:9/w\""
    )))
    .expect("a process model's own fields");
}

/// Every settings example in the README is valid as printed: a newcomer
/// copies them.
#[test]
fn every_settings_example_of_the_readme_is_valid() {
    let readme = include_str!("../README.md");
    let blocks: Vec<&str> = readme
        .split("```toml\n")
        .skip(1)
        .filter_map(|rest| rest.split_once("```").map(|(block, _)| block))
        .collect();
    assert!(blocks.len() >= 5, "found {} TOML blocks", blocks.len());
    for block in blocks {
        let checked = if vram_manager::scenario::looks_like_scenario(block) {
            vram_manager::scenario::Scenario::parse("README", block).map(drop)
        } else {
            Settings::parse(block).map(drop)
        };
        if let Err(e) = checked {
            panic!("README example refused: {e}\n{block}");
        }
    }
}
