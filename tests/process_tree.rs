//! No process outlives its model or the manager: real shell scripts as
//! model servers, with workers that ignore SIGTERM, leaders that exit
//! first, `setsid` daemons, wrappers, foreign servers on the ready port,
//! servers that are not descendants at all (a `stop` command), and the
//! manager itself interrupted or killed.
//!
//! Every process a test starts carries a mark in its environment; after
//! each test, `/proc` must hold no process with that mark.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Events, free_port, marked, temp_file};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use vram_manager::{Load, Manager, Status, Unload, VramEvent};

const STAND_IN: &str = env!("CARGO_BIN_EXE_vram-stand-in");
const MANAGER: &str = env!("CARGO_BIN_EXE_vram-manager");

/// A mark unique to one test, put in the environment of what it starts.
fn mark(test: &str) -> String {
    format!("{test}-{}", std::process::id())
}

/// Waits (on the process table, up to `limit`) until no process holds
/// `mark`; answers those still there.
fn left_after(mark: &str, limit: Duration) -> Vec<i32> {
    let deadline = Instant::now() + limit;
    loop {
        let left = marked(mark);
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads a pid a script wrote to `path`, waiting up to 10 s for it.
fn pid_in(path: &Path) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(pid) = text.trim().parse()
        {
            return pid;
        }
        assert!(Instant::now() < deadline, "no pid in {}", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn running(pid: i32) -> bool {
    vram_manager::keeper::is_running(Pid::from_raw(pid))
}

/// A fresh empty directory for one test's files.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("tree-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A process model running `sh -c SCRIPT`, ready when `port` accepts.
fn sh_model(id: &str, port: u16, mark: &str, script: &str, extra: &str) -> String {
    let script = script.replace('\\', "\\\\").replace('"', "\\\"");
    format!(
        "[[models]]\nid = \"{id}\"\nkind = \"llm\"\nvram = \"4GiB\"\nbackend = \"process\"\n\
         command = [\"sh\", \"-c\", \"{script}\"]\nready = \"tcp://127.0.0.1:{port}\"\n\
         env = {{ VRAM_TEST_MARK = \"{mark}\" }}\n{extra}\n"
    )
}

fn manager(toml: &str) -> Manager {
    let settings =
        vram_manager::config::Settings::parse(&format!("[gpu]\nprobe = \"none\"\n{toml}"))
            .expect("test settings are valid");
    Manager::start(&settings).expect("manager starts")
}

#[actix_rt::test]
async fn a_worker_ignoring_sigterm_dies_with_a_leader_that_exits_on_sigterm() {
    let (mark, dir, port) = (mark("worker"), scratch("worker"), free_port());
    let worker = dir.join("worker.pid");
    let script = format!(
        "sh -c 'echo $$ > {w}; trap \"\" TERM; while :; do sleep 1; done' & exec {STAND_IN} --port {port}",
        w = worker.display()
    );
    let m = manager(&sh_model(
        "llm",
        port,
        &mark,
        &script,
        "stop_timeout = \"300ms\"",
    ));
    m.addr.send(Load::new("llm")).await.unwrap().unwrap();
    let worker = pid_in(&worker);
    assert!(running(worker));
    m.addr.send(Unload::new("llm")).await.unwrap().unwrap();
    // The unload finished only once the whole tree was gone.
    assert!(!running(worker), "the worker outlived the unload");
    assert_eq!(marked(&mark), Vec::<i32>::new());
    assert_eq!(
        m.processes["llm"].last_exit("llm").as_deref(),
        Some("signal: 15 (SIGTERM)"),
        "the leader itself honoured SIGTERM"
    );
}

#[actix_rt::test]
async fn a_leader_exiting_while_resident_takes_its_worker_with_it() {
    let (mark, dir, port) = (mark("leader-exits"), scratch("leader-exits"), free_port());
    let worker = dir.join("worker.pid");
    let script = format!(
        "sh -c 'echo $$ > {w}; exec sleep 300' & exec {STAND_IN} --port {port} --exit-after-ms 400 --exit-code 7",
        w = worker.display()
    );
    let m = manager(&sh_model("llm", port, &mark, &script, ""));
    let mut events = Events::subscribe(&m.addr).await;
    m.addr.send(Load::new("llm")).await.unwrap().unwrap();
    let worker = pid_in(&worker);
    let reason = events
        .next(|e| match e {
            VramEvent::ModelExited { reason, .. } => Some(reason),
            _ => None,
        })
        .await;
    assert!(
        reason.starts_with("model server exited (exit status: 7)"),
        "{reason}"
    );
    // model_exited is reported once the tree is gone.
    assert!(!running(worker), "the worker outlived its leader");
    assert_eq!(marked(&mark), Vec::<i32>::new());
    assert!(m.addr.send(Status).await.unwrap().models.is_empty());
}

#[actix_rt::test]
async fn a_script_failing_before_ready_leaves_no_worker() {
    let (mark, dir, port) = (mark("fails"), scratch("fails"), free_port());
    let worker = dir.join("worker.pid");
    let script = format!(
        "sh -c 'echo $$ > {w}; exec sleep 300' & sleep 0.2; echo 'error: model file not found' >&2; exit 3",
        w = worker.display()
    );
    let m = manager(&sh_model("llm", port, &mark, &script, ""));
    let err = m.addr.send(Load::new("llm")).await.unwrap().unwrap_err();
    assert_eq!(err.code(), "backend_failed");
    let text = err.to_string();
    assert!(
        text.contains("exited before it was ready (exit status: 3)")
            && text.contains("model file not found"),
        "{text}"
    );
    assert!(
        !running(pid_in(&worker)),
        "the worker outlived the failed load"
    );
    assert_eq!(marked(&mark), Vec::<i32>::new());
}

#[actix_rt::test]
async fn a_setsid_double_forked_daemon_is_stopped_with_its_model() {
    if Command::new("setsid").arg("--version").output().is_err() {
        println!("skipped: `setsid` (util-linux) is not installed");
        return;
    }
    let (mark, dir, port) = (mark("daemon"), scratch("daemon"), free_port());
    let daemon = dir.join("daemon.pid");
    // The subshell exits at once: the daemon, in its own session, is an
    // orphan that would go to PID 1 without the keeper as subreaper.
    let script = format!(
        "(setsid sh -c 'echo $$ > {d}; exec sleep 300' &); exec {STAND_IN} --port {port}",
        d = daemon.display()
    );
    let m = manager(&sh_model("llm", port, &mark, &script, ""));
    m.addr.send(Load::new("llm")).await.unwrap().unwrap();
    let daemon = pid_in(&daemon);
    assert!(running(daemon));
    let session = std::fs::read_to_string(format!("/proc/{daemon}/stat")).unwrap();
    let sid: i32 = session
        .rsplit_once(") ")
        .unwrap()
        .1
        .split(' ')
        .nth(3)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(sid, daemon, "the daemon leads its own session");
    m.addr.send(Unload::new("llm")).await.unwrap().unwrap();
    assert!(!running(daemon), "the setsid daemon escaped");
    assert_eq!(marked(&mark), Vec::<i32>::new());
}

#[actix_rt::test]
async fn a_foreign_server_on_the_ready_port_fails_the_load_and_starts_nothing() {
    let (mark, dir) = (mark("foreign"), scratch("foreign"));
    let foreign = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = foreign.local_addr().unwrap().port();
    let started = dir.join("started");
    // A "server" that never listens: today's ready check would have taken
    // the foreign server's answer for it.
    let sleeper = sh_model(
        "sleeper",
        port,
        &mark,
        &format!("touch {}; exec sleep 30", started.display()),
        "",
    );
    // A real server that cannot bind the port.
    let real = format!(
        "[[models]]\nid = \"real\"\nkind = \"tts\"\nvram = \"1GiB\"\nbackend = \"process\"\n\
         command = [\"{STAND_IN}\", \"--port\", \"{port}\"]\nready = \"http://127.0.0.1:{port}/health\"\n\
         env = {{ VRAM_TEST_MARK = \"{mark}\" }}\n"
    );
    let m = manager(&format!("{sleeper}{real}"));
    for id in ["sleeper", "real"] {
        let err = m.addr.send(Load::new(id)).await.unwrap().unwrap_err();
        assert_eq!(err.code(), "backend_failed", "{err}");
        assert!(
            err.to_string()
                .contains(&format!("port {port} is already in use by another process")),
            "{err}"
        );
    }
    assert!(!started.exists(), "nothing was started");
    assert_eq!(marked(&mark), Vec::<i32>::new());
    assert!(m.addr.send(Status).await.unwrap().models.is_empty());
    drop(foreign);
}

/// A daemon of the test's own (as dockerd is to `docker run`): asked
/// through files in `dir`, it starts the stand-in as its own child and
/// stops it, so the server is never a descendant of the model's command.
/// The daemon, killed (and reaped) with everything it started when
/// dropped, so a failing test leaves no helper behind.
struct KillOnDrop(Child, String);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        for pid in marked(&self.1) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

fn daemon(dir: &Path, port: u16, mark: &str) -> KillOnDrop {
    let script = format!(
        "while :; do \
           if [ -e {d}/start ]; then rm {d}/start; {STAND_IN} --port {port} --pid-file {d}/server.pid & fi; \
           if [ -e {d}/stop ]; then kill $(cat {d}/server.pid); wait; rm {d}/stop; fi; \
           sleep 0.02; \
         done",
        d = dir.display()
    );
    KillOnDrop(
        Command::new("sh")
            .args(["-c", &script])
            .env("VRAM_TEST_MARK", mark)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
        mark.to_string(),
    )
}

#[actix_rt::test]
async fn a_stop_command_stops_a_server_that_is_not_a_descendant() {
    let (mark, dir, port) = (mark("stop-cmd"), scratch("stop-cmd"), free_port());
    let daemon_mark = format!("{mark}-daemon");
    let helper = daemon(&dir, port, &daemon_mark);
    let run = format!("touch {}/start; exec sleep 300", dir.display());
    let stop = format!(
        "stop = [\"sh\", \"-c\", \"touch {d}/stop; while [ -e {d}/stop ]; do sleep 0.02; done\"]\nstop_timeout = \"5s\"",
        d = dir.display()
    );
    let with_stop = sh_model("with-stop", port, &mark, &run, &stop);
    let without_stop =
        sh_model("no-stop", port, &mark, &run, "").replace("kind = \"llm\"", "kind = \"tts\"");
    let m = manager(&format!("{with_stop}{without_stop}"));

    // Without `stop`, the unload stops the client but the server lives on.
    m.addr.send(Load::new("no-stop")).await.unwrap().unwrap();
    let server = pid_in(&dir.join("server.pid"));
    m.addr.send(Unload::new("no-stop")).await.unwrap().unwrap();
    assert!(
        running(server),
        "without stop the server outlives the unload"
    );
    assert_eq!(marked(&mark), Vec::<i32>::new(), "the client is gone");
    kill(Pid::from_raw(server), Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while running(server) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!running(server), "the stray server was stopped by hand");
    std::fs::remove_file(dir.join("server.pid")).unwrap();

    // With `stop`, nothing remains.
    m.addr.send(Load::new("with-stop")).await.unwrap().unwrap();
    let server = pid_in(&dir.join("server.pid"));
    m.addr
        .send(Unload::new("with-stop"))
        .await
        .unwrap()
        .unwrap();
    assert!(!running(server), "the stop command stopped the server");
    assert_eq!(marked(&mark), Vec::<i32>::new());
    drop(helper);
    assert_eq!(
        left_after(&daemon_mark, Duration::from_secs(5)),
        Vec::<i32>::new()
    );
}

/// A scenario whose model is the stand-in behind a wrapper script (the
/// server is the wrapper's child, not the manager's), resident while the
/// scenario sleeps.
fn wrapped_scenario(name: &str, mark: &str) -> (PathBuf, PathBuf, u16) {
    let dir = scratch(name);
    let port = free_port();
    let pid_file = dir.join("server.pid");
    let wrapper = format!(
        "{STAND_IN} --port {port} --pid-file {}; echo done",
        pid_file.display()
    );
    let text = format!(
        "[gpu]\nprobe = \"none\"\n{}[[steps]]\nop = \"load\"\nmodel = \"llm\"\n[[steps]]\nop = \"sleep\"\nms = 60000\n",
        sh_model("llm", port, mark, &wrapper, "")
    );
    (temp_file(&format!("{name}.toml"), &text), pid_file, port)
}

/// Starts `vram-manager scenario` on `path` and waits until the server
/// behind the wrapper answers.
fn start_scenario(path: &Path, pid_file: &Path, port: u16) -> (Child, i32) {
    let child = Command::new(MANAGER)
        .args(["scenario", path.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let server = pid_in(pid_file);
    common::wait_listening(port, "the server");
    (child, server)
}

fn signal_the_manager(signal: Signal, code: Option<i32>) {
    let name = format!("{signal:?}").to_lowercase();
    let mark = mark(&name);
    let (path, pid_file, port) = wrapped_scenario(&name, &mark);
    let (mut child, server) = start_scenario(&path, &pid_file, port);
    assert!(running(server));
    kill(Pid::from_raw(child.id() as i32), signal).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), code, "exit status after {signal:?}");
    // After SIGKILL the keeper stops the tree on its own; give it the
    // default stop_timeout and a margin.
    let left = left_after(&mark, Duration::from_secs(15));
    assert_eq!(left, Vec::<i32>::new(), "processes left after {signal:?}");
    assert!(!running(server));
}

#[test]
fn sigint_of_the_manager_stops_every_server_and_exits_130() {
    signal_the_manager(Signal::SIGINT, Some(130));
}

#[test]
fn sigterm_of_the_manager_stops_every_server_and_exits_143() {
    signal_the_manager(Signal::SIGTERM, Some(143));
}

#[test]
fn sigkill_of_the_manager_leaves_no_server_behind() {
    signal_the_manager(Signal::SIGKILL, None);
}

/// The parent of process `pid`.
fn parent_of(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit_once(") ")
        .unwrap()
        .1
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

#[actix_rt::test]
async fn a_killed_keeper_takes_its_server_with_it() {
    let (mark, dir, port) = (mark("keeper-killed"), scratch("keeper-killed"), free_port());
    let worker = dir.join("worker.pid");
    let script = format!(
        "sh -c 'echo $$ > {w}; exec sleep 300' & exec {STAND_IN} --port {port}",
        w = worker.display()
    );
    let m = manager(&sh_model("llm", port, &mark, &script, ""));
    let mut events = Events::subscribe(&m.addr).await;
    m.addr.send(Load::new("llm")).await.unwrap().unwrap();
    let server = m.processes["llm"].pids()["llm"];
    pid_in(&worker);
    // As the OOM killer would: the keeper dies without a word.
    kill(Pid::from_raw(parent_of(server)), Signal::SIGKILL).unwrap();
    let reason = events
        .next(|e| match e {
            VramEvent::ModelExited { reason, .. } => Some(reason),
            _ => None,
        })
        .await;
    assert!(reason.contains("its keeper was killed"), "{reason}");
    assert_eq!(left_after(&mark, Duration::from_secs(5)), Vec::<i32>::new());
    assert!(m.addr.send(Status).await.unwrap().models.is_empty());
}

#[actix_rt::test]
async fn a_server_writing_invalid_utf8_to_stderr_keeps_its_reader() {
    let (mark, dir, port) = (mark("utf8"), scratch("utf8"), free_port());
    let ticker = dir.join("ticker.pid");
    // A stray byte, then a log line every 20 ms: without a reader the
    // next write would die of SIGPIPE.
    let script = format!(
        "printf 'caf\\351 au lait\\n' >&2; (while :; do echo tick >&2; sleep 0.02; done) & echo $! > {t}; exec {STAND_IN} --port {port}",
        t = ticker.display()
    );
    let m = manager(&sh_model("llm", port, &mark, &script, ""));
    m.addr.send(Load::new("llm")).await.unwrap().unwrap();
    let ticker = pid_in(&ticker);
    actix::clock::sleep(Duration::from_millis(300)).await;
    assert!(running(ticker), "the logging process died of SIGPIPE");
    m.addr.send(Unload::new("llm")).await.unwrap().unwrap();
    assert_eq!(marked(&mark), Vec::<i32>::new());
}

#[actix_rt::test]
async fn a_failed_load_still_runs_the_stop_command() {
    let (mark, dir, port) = (mark("stop-on-fail"), scratch("stop-on-fail"), free_port());
    let stopped = dir.join("stopped");
    let extra = format!(
        "stop = [\"touch\", \"{}\"]\nready_timeout = \"300ms\"",
        stopped.display()
    );
    // Never listens: the ready check runs out.
    let m = manager(&sh_model("llm", port, &mark, "exec sleep 300", &extra));
    let err = m.addr.send(Load::new("llm")).await.unwrap().unwrap_err();
    assert_eq!(err.code(), "timeout", "{err}");
    assert!(
        stopped.exists(),
        "the stop command ran (a container would be up)"
    );
    assert_eq!(marked(&mark), Vec::<i32>::new());
}
