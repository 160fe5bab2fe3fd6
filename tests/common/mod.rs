//! Helpers shared by the integration tests: running the binary, writing
//! temporary files, and building settings from TOML.
#![allow(dead_code)] // each test file uses its own subset

use std::path::PathBuf;
use std::process::{Command, Output};

/// One GiB in bytes.
pub const GIB: u64 = 1 << 30;

/// Runs the `vram-manager` binary with `args` and extra environment.
pub fn run_cli(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vram-manager"));
    cmd.args(args).current_dir(env!("CARGO_MANIFEST_DIR"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("the binary runs")
}

/// Exit status, stdout and stderr of a run, as text.
pub fn outcome(output: &Output) -> (i32, String, String) {
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A port nobody listens on right now, and never handed out before in
/// this test process: the kernel may give a port just let go to the next
/// caller, and tests running in parallel would then start two servers on
/// one port.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if given.insert(port) {
            return port;
        }
    }
}

/// Stops `child` with SIGTERM and waits for it, unless it has already
/// ended: once reaped, its process id may belong to another process (this
/// machine's ids wrap at 32768), which a signal must not reach.
pub fn terminate(child: &mut std::process::Child) {
    if let Ok(None) = child.try_wait() {
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = child.wait();
    }
}

/// Waits (up to 10 s) until something listens on `port` of 127.0.0.1;
/// fails the test, naming `what`, if nothing does.
pub fn wait_listening(port: u16, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} never listened"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The running (not zombie) processes whose environment holds `mark`.
pub fn marked(mark: &str) -> Vec<i32> {
    let needle = format!("VRAM_TEST_MARK={mark}");
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == needle.as_bytes()))
        })
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                s.rsplit_once(") ")
                    .is_some_and(|(_, rest)| !rest.starts_with('Z'))
            })
        })
        .collect()
}

/// Writes `text` to a fresh file under the target directory and answers
/// its path. Each name must be unique within the test binary.
pub fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let path = dir.join(format!("{}-{name}", std::process::id()));
    std::fs::write(&path, text).expect("temp file written");
    path
}

use vram_manager::config::Settings;
use vram_manager::{Load, Manager, Status, StatusReport, VramError};

/// Settings from TOML layered over the defaults.
pub fn settings(toml: &str) -> Settings {
    Settings::parse(toml).expect("test settings are valid")
}

/// The default manager configuration (a 16 GiB card) over `catalog`.
pub fn default_config(catalog: vram_manager::Catalog) -> vram_manager::ManagerConfig {
    let defaults = Settings::defaults().expect("the defaults are valid");
    vram_manager::ManagerConfig {
        catalog,
        ..Manager::config(&defaults).expect("the defaults describe a card")
    }
}

/// Starts a manager from TOML settings (inside an actix test).
pub fn start(toml: &str) -> Manager {
    Manager::start(&settings(toml)).expect("manager starts")
}

/// A `[[models]]` entry: id, kind, size in GiB, extra keys.
pub fn model(id: &str, kind: &str, gib: u64, extra: &str) -> String {
    format!("[[models]]\nid = \"{id}\"\nkind = \"{kind}\"\nvram = \"{gib}GiB\"\n{extra}\n")
}

/// Loads `id`, answering the evicted models or the error code.
pub async fn load(m: &Manager, id: &str) -> Result<Vec<String>, &'static str> {
    m.addr
        .send(Load::new(id))
        .await
        .expect("manager answers")
        .map(|l| l.evicted.iter().map(ToString::to_string).collect())
        .map_err(|e: VramError| e.code())
}

/// The current status.
pub async fn status(m: &Manager) -> StatusReport {
    m.addr.send(Status).await.expect("manager answers")
}

/// Ids of resident models, sorted.
pub async fn resident(m: &Manager) -> Vec<String> {
    status(m).await.resident()
}

use std::collections::BTreeMap;
use std::rc::Rc;

use actix::prelude::*;
use vram_manager::backends::FaultBackend;
use vram_manager::{Backend, ManagerConfig, VramActor};

/// A manager over scripted fault backends (one per default kind), with a
/// 1 ms restart back-off capped at 2 ms. Answers the manager and the
/// backends by kind.
pub fn start_faulty(toml: &str) -> (Addr<VramActor>, BTreeMap<String, FaultBackend>) {
    let (config, backends) = faulty(toml);
    let by_kind = backends
        .iter()
        .map(|(k, b)| (k.clone(), Rc::new(b.clone()) as Rc<dyn Backend>))
        .collect();
    (VramActor::new(config, by_kind).start(), backends)
}

/// The configuration and scripted fault backends `start_faulty` uses.
pub fn faulty(toml: &str) -> (ManagerConfig, BTreeMap<String, FaultBackend>) {
    let settings = settings(&format!(
        "[policy]\nrestart_backoff = \"1ms\"\nrestart_backoff_max = \"2ms\"\n{toml}"
    ));
    let config = Manager::config(&settings).expect("capacity is known");
    let backends = settings
        .kinds
        .iter()
        .map(|k| (k.name.clone(), FaultBackend::scripted()))
        .collect();
    (config, backends)
}

use vram_manager::{Subscribe, VramEvent};

/// Receives a manager's events, in order, for a test to await.
pub struct Events {
    rx: tokio::sync::mpsc::UnboundedReceiver<VramEvent>,
    forward: Addr<Forward>,
}

/// Forwards events into the channel of an [`Events`].
pub struct Forward(tokio::sync::mpsc::UnboundedSender<VramEvent>);

impl Actor for Forward {
    type Context = Context<Self>;
}

impl Handler<VramEvent> for Forward {
    type Result = ();
    fn handle(&mut self, e: VramEvent, _: &mut Context<Self>) {
        let _ = self.0.send(e);
    }
}

/// Answered once every event sent to the forwarder before it is forwarded.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Flush;

impl Handler<Flush> for Forward {
    type Result = ();
    fn handle(&mut self, _: Flush, _: &mut Context<Self>) {}
}

impl Events {
    /// Subscribes to `manager`'s events from now on.
    pub async fn subscribe(manager: &Addr<VramActor>) -> Self {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let forward = Forward(tx).start();
        manager
            .send(Subscribe(forward.clone().recipient()))
            .await
            .expect("manager answers");
        Self { rx, forward }
    }

    /// Subscribes through `handle` (one card or several) from now on.
    pub async fn subscribe_handle(handle: &vram_manager::VramHandle) -> Self {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let forward = Forward(tx).start();
        handle
            .subscribe(forward.clone().recipient())
            .await
            .expect("manager answers");
        Self { rx, forward }
    }

    /// Every event published before this call (events are sent before the
    /// answer of the request that caused them).
    pub async fn drain(&mut self) -> Vec<VramEvent> {
        self.forward.send(Flush).await.expect("forwarder answers");
        let mut events = Vec::new();
        while let Ok(e) = self.rx.try_recv() {
            events.push(e);
        }
        events
    }

    /// Waits (up to 10 s) for the next event `pick` accepts.
    pub async fn next<T>(&mut self, mut pick: impl FnMut(VramEvent) -> Option<T>) -> T {
        loop {
            let event = tokio::time::timeout(std::time::Duration::from_secs(10), self.rx.recv())
                .await
                .expect("the event within 10 s")
                .expect("events keep coming");
            if let Some(found) = pick(event) {
                return found;
            }
        }
    }
}
