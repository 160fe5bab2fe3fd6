//! The process backend against a real child process (the `vram-stand-in`
//! model-server stand-in): ready, exits before ready, never ready, SIGTERM
//! honoured and ignored, a crash while resident, and no orphan left.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Events, free_port, outcome, run_cli, settings, temp_file};
use vram_manager::{Acquire, Load, Manager, Status, Unload, VramEvent};

const STAND_IN: &str = env!("CARGO_BIN_EXE_vram-stand-in");

/// Whether a process is running (a zombie is not).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Waits (on the process table, up to 5 s) until `pid` is gone.
fn gone(pid: i32) -> bool {
    for _ in 0..500 {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// A process-backed model `id` running the stand-in with `args`.
fn process_model(id: &str, port: u16, ready: &str, args: &str, extra: &str) -> String {
    format!(
        "[[models]]\nid = \"{id}\"\nkind = \"llm\"\nvram = \"4GiB\"\nbackend = \"process\"\n\
         command = [\"{STAND_IN}\", \"--port\", \"{port}\"{args}]\nready = \"{ready}\"\n{extra}\n"
    )
}

/// A manager whose model "llm" is the stand-in with `args`, ready when
/// its port accepts connections.
fn tcp_llm(args: &str, extra: &str) -> Manager {
    let port = free_port();
    manager(&process_model(
        "llm",
        port,
        &format!("tcp://127.0.0.1:{port}"),
        args,
        extra,
    ))
}

fn manager(toml: &str) -> Manager {
    Manager::start(&settings(&format!("[gpu]\nprobe = \"none\"\n{toml}"))).unwrap()
}

#[actix_rt::test]
async fn an_http_ready_server_is_started_and_sigterm_stops_it() {
    let port = free_port();
    let m = manager(&process_model(
        "llm",
        port,
        &format!("http://127.0.0.1:{port}/health"),
        ", \"--ready-after-ms\", \"200\"",
        "stop_timeout = \"20s\"",
    ));
    m.addr.send(Load::new("llm")).await.unwrap().unwrap();
    let pid = m.processes["llm"].pids()["llm"];
    assert!(alive(pid));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "it is listening"
    );
    m.addr.send(Unload::new("llm")).await.unwrap().unwrap();
    assert!(gone(pid));
    assert_eq!(
        m.processes["llm"].last_exit("llm").as_deref(),
        Some("signal: 15 (SIGTERM)")
    );
    assert!(m.addr.send(Status).await.unwrap().models.is_empty());
}

#[actix_rt::test]
async fn a_tcp_ready_check_works() {
    let m = tcp_llm("", "");
    m.addr.send(Load::new("llm")).await.unwrap().unwrap();
    assert!(alive(m.processes["llm"].pids()["llm"]));
}

#[actix_rt::test]
async fn a_server_that_exits_before_ready_is_backend_failed_with_its_stderr() {
    let port = free_port();
    let m = manager(&process_model(
        "llm",
        port,
        &format!("http://127.0.0.1:{port}/health"),
        ", \"--fail-at-start\", \"--exit-code\", \"3\"",
        "",
    ));
    let err = m.addr.send(Load::new("llm")).await.unwrap().unwrap_err();
    assert_eq!(err.code(), "backend_failed");
    let text = err.to_string();
    assert!(
        text.contains("exit status: 3") && text.contains("out of memory"),
        "{text}"
    );
    assert!(m.addr.send(Status).await.unwrap().models.is_empty());
}

#[actix_rt::test]
async fn a_server_never_ready_times_out_and_is_killed() {
    let port = free_port();
    let pid_file = temp_file("never-ready.pid", "");
    let m = manager(&process_model(
        "llm",
        port,
        &format!("http://127.0.0.1:{port}/health"),
        &format!(
            ", \"--never-ready\", \"--pid-file\", \"{}\"",
            pid_file.display()
        ),
        "ready_timeout = \"300ms\"",
    ));
    let err = m.addr.send(Load::new("llm")).await.unwrap().unwrap_err();
    assert_eq!(err.code(), "timeout", "{err}");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(gone(pid), "the never-ready server was killed");
    assert!(m.addr.send(Status).await.unwrap().models.is_empty());
}

#[actix_rt::test]
async fn a_server_ignoring_sigterm_is_killed_after_stop_timeout() {
    let m = tcp_llm(", \"--ignore-sigterm\"", "stop_timeout = \"300ms\"");
    m.addr.send(Load::new("llm")).await.unwrap().unwrap();
    let pid = m.processes["llm"].pids()["llm"];
    m.addr.send(Unload::new("llm")).await.unwrap().unwrap();
    assert!(gone(pid));
    assert_eq!(
        m.processes["llm"].last_exit("llm").as_deref(),
        Some("signal: 9 (SIGKILL)")
    );
}

#[actix_rt::test]
async fn a_server_crashing_while_resident_leaves_the_ledger() {
    let m = tcp_llm(
        ", \"--exit-after-ms\", \"300\", \"--exit-code\", \"139\"",
        "",
    );
    let mut events = Events::subscribe(&m.addr).await;
    let lease = m.addr.send(Acquire::new("llm")).await.unwrap().unwrap();
    let (model, reason) = events
        .next(|e| match e {
            VramEvent::ModelExited { model, reason, .. } => Some((model, reason)),
            _ => None,
        })
        .await;
    assert_eq!(model, "llm");
    assert!(
        reason.contains("exit status: 139") && reason.contains("segmentation fault"),
        "{reason}"
    );
    assert!(m.addr.send(Status).await.unwrap().models.is_empty());
    assert!(!lease.is_valid(), "the lease died with the server");
    // It can be loaded again.
    m.addr.send(Load::new("llm")).await.unwrap().unwrap();
}

fn scenario_text(port: u16, bad_port: u16, slow_port: u16, pid_file: &Path) -> String {
    format!(
        "description = \"process backend\"\n[gpu]\nprobe = \"none\"\n{}{}{}\
         [[steps]]\nop = \"load\"\nmodel = \"server\"\nresident = [\"server\"]\n\
         [[steps]]\nop = \"load\"\nmodel = \"broken\"\nexpect = \"backend_failed\"\nresident = [\"server\"]\n\
         [[steps]]\nop = \"load\"\nmodel = \"stuck\"\nexpect = \"timeout\"\nresident = [\"server\"]\n",
        process_model(
            "server",
            port,
            &format!("http://127.0.0.1:{port}/health"),
            &format!(", \"--pid-file\", \"{}\"", pid_file.display()),
            ""
        ),
        process_model(
            "broken",
            bad_port,
            &format!("tcp://127.0.0.1:{bad_port}"),
            ", \"--fail-at-start\"",
            ""
        ),
        process_model(
            "stuck",
            slow_port,
            &format!("http://127.0.0.1:{slow_port}/health"),
            ", \"--never-ready\"",
            "ready_timeout = \"300ms\""
        ),
    )
}

#[test]
fn a_scenario_runs_real_processes_and_leaves_none_behind() {
    let pid_file = temp_file("scenario-server.pid", "");
    let text = scenario_text(free_port(), free_port(), free_port(), &pid_file);
    // The last step leaves "server" running: the manager must stop it when
    // it exits.
    let path = temp_file("process-scenario.toml", &text);
    let (code, out, err) = outcome(&run_cli(
        &["scenario", path.to_str().unwrap(), "--json"],
        &[],
    ));
    assert_eq!(code, 0, "{out}\n{err}");
    // No simulated card: the peak is the ledger's (one 4 GiB server).
    let summary: serde_json::Value =
        serde_json::from_str(out.lines().last().unwrap_or_default()).unwrap();
    assert_eq!(summary["summary"]["peak"], 4u64 << 30, "{out}");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(gone(pid), "no model server outlives the manager");
    // With an explicit unload at the end, it is gone before the exit too.
    let with_unload =
        format!("{text}[[steps]]\nop = \"unload\"\nmodel = \"server\"\nresident = []\n");
    let text = with_unload.replace(&format!("\"{}\"", pid_file.display()), "\"/dev/null\"");
    let path = temp_file("process-scenario-unload.toml", &text);
    let (code, out, err) = outcome(&run_cli(&["scenario", path.to_str().unwrap()], &[]));
    assert_eq!(code, 0, "{out}\n{err}");
}

#[test]
fn the_documented_process_configs_are_valid() {
    let (code, out, err) = outcome(&run_cli(
        &["check-config", "examples/process_backends.toml"],
        &[
            ("VRAM__GPU__TOTAL", "16GiB"),
            ("VRAM__GPU__DEVICE", "GPU-00000000-none"),
        ],
    ));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("llama-3.1-8b-q4_k_m") && out.contains("process"),
        "{out}"
    );
}

#[test]
fn the_runnable_stand_in_example_passes() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let text = std::fs::read_to_string(format!("{dir}/examples/process_stand_in.toml")).unwrap();
    // The file names the debug build's stand-in; use this build's.
    let text = text.replace("target/debug/vram-stand-in", STAND_IN);
    let path = temp_file("process-stand-in.toml", &text);
    let (code, out, err) = outcome(&run_cli(&["scenario", path.to_str().unwrap()], &[]));
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("0 failed"), "{out}");
}

#[test]
fn ctrl_c_on_the_manager_leaves_no_model_server_behind() {
    let port = free_port();
    let pid_file = temp_file("ctrl-c.pid", "");
    let text = format!(
        "[gpu]\nprobe = \"none\"\n{}[[steps]]\nop = \"load\"\nmodel = \"server\"\n[[steps]]\nop = \"sleep\"\nms = 30000\n",
        process_model(
            "server",
            port,
            &format!("tcp://127.0.0.1:{port}"),
            &format!(", \"--pid-file\", \"{}\"", pid_file.display()),
            ""
        )
    );
    let path = temp_file("ctrl-c.toml", &text);
    let mut manager = std::process::Command::new(env!("CARGO_BIN_EXE_vram-manager"))
        .args(["scenario", path.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait (on the file system) until the model server is up.
    let mut pid = None;
    for _ in 0..1000 {
        if let Ok(text) = std::fs::read_to_string(&pid_file)
            && let Ok(p) = text.trim().parse::<i32>()
            && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        {
            pid = Some(p);
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid = pid.expect("the model server started");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(manager.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = manager.wait().unwrap();
    assert!(!status.success());
    assert!(gone(pid), "the model server died with the manager");
}

#[actix_rt::test]
async fn a_backend_restart_kills_its_model_servers() {
    let m = tcp_llm("", "");
    m.addr.send(Load::new("llm")).await.unwrap().unwrap();
    let pid = m.processes["llm"].pids()["llm"];
    m.addr
        .send(vram_manager::CrashBackend { kind: "llm".into() })
        .await
        .unwrap()
        .unwrap();
    assert!(gone(pid), "no orphan after the restart");
    assert!(m.addr.send(Status).await.unwrap().models.is_empty());
    m.addr.send(Load::new("llm")).await.unwrap().unwrap();
    assert_ne!(m.processes["llm"].pids()["llm"], pid, "a fresh server");
}

#[actix_rt::test]
async fn a_ready_timeout_names_the_last_probe_answer_and_the_stderr_tail() {
    let port = free_port();
    let m = manager(&process_model(
        "llm",
        port,
        &format!("http://127.0.0.1:{port}/health"),
        ", \"--never-ready\"",
        "ready_timeout = \"300ms\"",
    ));
    let mut events = Events::subscribe(&m.addr).await;
    let err = m.addr.send(Load::new("llm")).await.unwrap().unwrap_err();
    assert_eq!(err.code(), "timeout");
    let text = err.to_string();
    assert!(
        text.contains("answered HTTP 503 Service Unavailable")
            && text.contains("loading model\"}")
            && text.contains(&format!("listening on 127.0.0.1:{port}")),
        "{text}"
    );
    let reason = events
        .next(|e| match e {
            VramEvent::LoadFailed { reason, .. } => Some(reason),
            _ => None,
        })
        .await;
    assert_eq!(reason, text, "the event carries the same reason");
}

#[actix_rt::test]
async fn a_server_without_the_ready_route_times_out_naming_the_404() {
    // As llama-cpp-python's server has no /health: the probe's answer says so.
    let port = free_port();
    let m = manager(&process_model(
        "llm",
        port,
        &format!("http://127.0.0.1:{port}/missing"),
        "",
        "ready_timeout = \"300ms\"",
    ));
    let err = m.addr.send(Load::new("llm")).await.unwrap().unwrap_err();
    assert_eq!(err.code(), "timeout");
    assert!(
        err.to_string().contains("answered HTTP 404 Not Found"),
        "{err}"
    );
}

#[test]
fn a_ready_timeout_reaches_the_cli_with_its_reason() {
    let port = free_port();
    let text = format!(
        "[gpu]\nprobe = \"none\"\n{}[[steps]]\nop = \"load\"\nmodel = \"llm\"\n",
        process_model(
            "llm",
            port,
            &format!("http://127.0.0.1:{port}/health"),
            ", \"--never-ready\"",
            "ready_timeout = \"300ms\""
        )
    );
    let path = temp_file("ready-timeout-cli.toml", &text);
    let (code, out, err) = outcome(&run_cli(&["scenario", path.to_str().unwrap()], &[]));
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        err.contains("expected result ok, got timeout") && err.contains("HTTP 503"),
        "{err}"
    );
}

#[test]
fn a_server_ignoring_sigterm_is_logged_as_such() {
    let port = free_port();
    let text = format!(
        "[gpu]\nprobe = \"none\"\n{}[[steps]]\nop = \"load\"\nmodel = \"llm\"\n[[steps]]\nop = \"unload\"\nmodel = \"llm\"\nresident = []\n",
        process_model(
            "llm",
            port,
            &format!("tcp://127.0.0.1:{port}"),
            ", \"--ignore-sigterm\"",
            "stop_timeout = \"200ms\""
        )
    );
    let path = temp_file("ignores-sigterm.toml", &text);
    let (code, out, err) = outcome(&run_cli(
        &["scenario", path.to_str().unwrap()],
        &[("RUST_LOG", "warn")],
    ));
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains(
            "did not exit within stop_timeout after SIGTERM (a request may still be running)"
        ),
        "{err}"
    );
}

#[actix_rt::test]
async fn a_server_is_started_on_its_card() {
    let port = free_port();
    let m = Manager::start(&settings(&format!(
        "[gpu]\nprobe = \"none\"\ndevice = \"1\"\n{}",
        process_model("llm", port, &format!("tcp://127.0.0.1:{port}"), "", "")
    )))
    .unwrap();
    m.addr.send(Load::new("llm")).await.unwrap().unwrap();
    let pid = m.processes["llm"].pids()["llm"];
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        environ
            .split(|b| *b == 0)
            .any(|v| v == b"CUDA_VISIBLE_DEVICES=1"),
        "the server sees card 1 only"
    );
    m.addr.send(Unload::new("llm")).await.unwrap().unwrap();
    assert!(gone(pid));
}
