//! The process backend: each model is a model-server process (llama.cpp's
//! `llama-server`, whisper.cpp's server, Piper behind a small HTTP front,
//! ...). Loading starts the command (an argv array, never a shell) under a
//! keeper (see [`crate::keeper`]) and waits until it is ready; unloading
//! stops the server's whole process tree.
//!
//! - Before starting: if the ready address already accepts connections,
//!   another program holds the port and would answer for ours, so the load
//!   fails with `backend_failed` naming the port and nothing is started.
//! - Ready: an `http://HOST:PORT/PATH` URL answering 2xx, or
//!   `tcp://HOST:PORT` accepting a connection, within `ready_timeout`, and
//!   the server itself still running after that answer. If it exits first:
//!   `backend_failed` with its exit status and the last lines of its
//!   stderr. If ready never comes: `timeout` naming the last probe's answer
//!   and the stderr tail, and the tree is killed.
//! - Stop: the model's `stop` command first, if it has one (for servers
//!   that are not its descendants, such as containers), then SIGTERM to
//!   every process of the tree, up to `stop_timeout`, SIGKILL to whatever
//!   remains. The unload finishes when no process of the tree remains.
//! - No process outlives the manager: keepers are started from one
//!   long-lived thread (never the arbiter, whose work must not block, nor a
//!   pool thread, whose exit would fire the parent-death signal), get
//!   SIGTERM from the kernel if the manager dies, and are told to stop or
//!   kill their trees on unload, on a dropped handle (a load abandoned on
//!   timeout, a backend restart) and on [`ProcessBackend::shutdown_all`].
//! - A model server that exits while resident takes its tree with it and
//!   is reported through [`Backend::watch`] once the tree is gone.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::path::PathBuf;
use std::process::Stdio;
use std::rc::Rc;
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::Duration;

use awc::http::Uri;
use futures::future::join_all;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use vram_actors::{Backend, BackendError, BackendFuture, ExitNotifier, ModelExit, ModelSpec};

use crate::keeper::{self, KEEPER_ARG, Report};

/// How many lines of a child's stderr are kept for error messages.
const STDERR_LINES: usize = 20;
/// How often readiness is checked while a server starts.
const READY_POLL: Duration = Duration::from_millis(50);
/// How long one readiness probe (connect, or HTTP request) may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How much of an HTTP probe's answer is quoted in an error.
const PROBE_BODY_CHARS: usize = 120;
/// Time a keeper gets beyond `stop_timeout` to SIGKILL and reap its tree.
const KEEPER_MARGIN: Duration = Duration::from_secs(5);

/// How to tell that a model server is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadyCheck {
    /// An HTTP GET of this URL answers 2xx.
    Http(String),
    /// A TCP connection to this `host:port` is accepted.
    Tcp(String),
}

impl ReadyCheck {
    /// Parses `http://HOST:PORT/PATH` or `tcp://HOST:PORT` (the port is
    /// required: it is what the server binds and what is checked free).
    pub fn parse(text: &str) -> Result<Self, String> {
        let uri: Uri = text
            .parse()
            .map_err(|e| format!("{text:?} is not a URL: {e}"))?;
        let (Some(host), Some(port)) = (uri.host().filter(|h| !h.is_empty()), uri.port_u16())
        else {
            return Err(format!(
                "{text:?} needs a host and a port, as in http://127.0.0.1:8080/health or tcp://127.0.0.1:8080"
            ));
        };
        match uri.scheme_str() {
            Some("http") => Ok(Self::Http(text.to_string())),
            Some("tcp") if uri.path().trim_matches('/').is_empty() => {
                Ok(Self::Tcp(format!("{host}:{port}")))
            }
            Some("tcp") => Err(format!("{text:?} is not tcp://HOST:PORT")),
            _ => Err(format!(
                "{text:?} is neither an http:// URL nor tcp://HOST:PORT"
            )),
        }
    }

    /// The `host:port` the server listens on.
    pub fn address(&self) -> String {
        match self {
            Self::Tcp(addr) => addr.clone(),
            Self::Http(url) => url
                .parse::<Uri>()
                .ok()
                .and_then(|u| Some(format!("{}:{}", u.host()?, u.port_u16()?)))
                .unwrap_or_default(),
        }
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.address()
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or(0)
    }
}

/// One process-backed model's command and lifecycle settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSpec {
    /// Program and arguments.
    pub command: Vec<String>,
    /// A command run before the process tree is stopped, for servers that
    /// are not descendants of `command` (a container that `docker run`
    /// only asked a daemon for). Empty: none.
    pub stop: Vec<String>,
    /// Extra environment variables.
    pub env: BTreeMap<String, String>,
    /// Working directory (the manager's when `None`).
    pub cwd: Option<PathBuf>,
    /// How to tell it is ready.
    pub ready: ReadyCheck,
    /// How long it may take to become ready.
    pub ready_timeout: Duration,
    /// How long its processes may take to exit after SIGTERM before
    /// SIGKILL; also the bound of the `stop` command.
    pub stop_timeout: Duration,
}

// ----------------------------------------------------------------- spawner

type Spawned = oneshot::Sender<io::Result<std::process::Child>>;

/// The thread every keeper is started from. It lives as long as the
/// process: a keeper's parent-death signal fires when the thread that
/// started it exits, so that thread must not be a short-lived pool thread;
/// and starting a process blocks, which the arbiter must not.
fn spawner() -> &'static mpsc::Sender<(std::process::Command, Spawned)> {
    static SPAWNER: OnceLock<mpsc::Sender<(std::process::Command, Spawned)>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<(std::process::Command, Spawned)>();
        let started = std::thread::Builder::new()
            .name("vram-spawner".to_string())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
            });
        if let Err(e) = started {
            // The receiver is gone with the closure: every spawn then fails
            // with a clear error instead of a panic.
            tracing::error!(error = %e, "cannot start the process-spawning thread");
        }
        tx
    })
}

/// Starts `command` on the spawner thread.
async fn spawn(command: std::process::Command) -> io::Result<std::process::Child> {
    let (tx, rx) = oneshot::channel();
    let gone = || io::Error::other("the process-spawning thread is not running");
    spawner().send((command, tx)).map_err(|_| gone())?;
    rx.await.map_err(|_| gone())?
}

/// Waits for `child` to exit without blocking the arbiter; answers how it
/// ended.
async fn reap(child: &mut std::process::Child) -> String {
    let mut pause = Duration::from_millis(1);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.to_string(),
            Ok(None) => {}
            Err(e) => return format!("unknown status ({e})"),
        }
        actix::clock::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

// -------------------------------------------------------------- stderr tail

/// The last lines of a server's stderr, without blank lines or a line that
/// repeats the one before (a progress bar, a retry loop).
#[derive(Debug, Default)]
struct StderrTail(VecDeque<String>);

impl StderrTail {
    fn push(&mut self, line: &str) {
        let line = line.trim_end();
        if line.trim().is_empty() || self.0.back().is_some_and(|last| last == line) {
            return;
        }
        if self.0.len() == STDERR_LINES {
            self.0.pop_front();
        }
        self.0.push_back(line.to_string());
    }

    fn text(&self) -> String {
        if self.0.is_empty() {
            "(no stderr)".to_string()
        } else {
            self.0.iter().cloned().collect::<Vec<_>>().join("\n")
        }
    }
}

/// Keeps the tail of `pipe` in `tail` until it closes.
fn collect_stderr(pipe: impl AsyncRead + Unpin + 'static, tail: Rc<RefCell<StderrTail>>) {
    actix::spawn(async move {
        let mut lines = BufReader::new(pipe).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tail.borrow_mut().push(&line);
        }
    });
}

// ------------------------------------------------------------------ server

/// A running model server under its keeper. Dropping it kills the tree.
struct Server {
    /// The keeper's process id (the manager's child).
    keeper: Pid,
    /// The model server's process id (the keeper's child).
    leader: Pid,
    /// The server's exit status once it has exited.
    exited: watch::Receiver<Option<String>>,
    /// True once the keeper has exited: no process of the tree remains.
    gone: watch::Receiver<bool>,
    stderr: Rc<RefCell<StderrTail>>,
}

impl Server {
    /// The server's exit status, if it has exited. Checks the process
    /// table too: the keeper's report may be a moment behind.
    fn has_exited(&self) -> Option<String> {
        if let Some(status) = self.exited.borrow().clone() {
            return Some(status);
        }
        (!keeper::is_running(self.leader)).then(|| "exited".to_string())
    }

    fn is_gone(&self) -> bool {
        *self.gone.borrow()
    }

    fn signal_keeper(&self, signal: Signal) {
        if !self.is_gone() {
            // The keeper may have exited a moment ago; that is the goal.
            let _ = kill(self.keeper, signal);
        }
    }

    /// Waits up to `limit` for the whole tree to be gone.
    async fn wait_gone(&mut self, limit: Duration) -> bool {
        tokio::time::timeout(limit, self.gone.wait_for(|g| *g))
            .await
            .is_ok_and(|r| r.is_ok())
            || self.is_gone()
    }

    /// SIGTERM to the tree, `stop_timeout`, SIGKILL; resolves when no
    /// process of it remains.
    async fn stop(mut self, id: &str, stop_timeout: Duration) -> Result<(), BackendError> {
        self.signal_keeper(Signal::SIGTERM);
        if self.wait_gone(stop_timeout + KEEPER_MARGIN).await {
            return Ok(());
        }
        tracing::error!(model = %id, keeper = self.keeper.as_raw(), "keeper did not finish; killing its tree now");
        self.signal_keeper(Signal::SIGUSR1);
        if self.wait_gone(KEEPER_MARGIN).await {
            return Ok(());
        }
        Err(BackendError::new(format!(
            "{id}: model server's processes survived SIGKILL"
        )))
    }

    fn stderr_tail(&self) -> String {
        self.stderr.borrow().text()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.signal_keeper(Signal::SIGUSR1);
    }
}

#[derive(Default)]
struct State {
    running: HashMap<String, Server>,
    /// Every keeper not yet gone, loading or resident, for shutdown.
    keepers: HashMap<i32, watch::Receiver<bool>>,
    notify: Option<ExitNotifier>,
    /// How each model's last server process ended, e.g.
    /// "signal: 15 (SIGTERM)".
    exits: HashMap<String, String>,
}

/// Runs each of its models as a model-server process. Clones share state.
#[derive(Clone, Default)]
pub struct ProcessBackend {
    specs: Rc<HashMap<String, ProcessSpec>>,
    state: Rc<RefCell<State>>,
}

impl std::fmt::Debug for ProcessBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessBackend")
            .field("models", &self.specs.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl ProcessBackend {
    /// A backend for these models.
    pub fn new(specs: HashMap<String, ProcessSpec>) -> Self {
        Self {
            specs: Rc::new(specs),
            state: Rc::default(),
        }
    }

    /// The process id of each running model server.
    pub fn pids(&self) -> BTreeMap<String, i32> {
        self.state
            .borrow()
            .running
            .iter()
            .map(|(id, s)| (id.clone(), s.leader.as_raw()))
            .collect()
    }

    /// How model `id`'s last server process ended ("exit status: 1",
    /// "signal: 9 (SIGKILL)", ...), if one has ended.
    pub fn last_exit(&self, id: &str) -> Option<String> {
        self.state.borrow().exits.get(id).cloned()
    }

    /// Whether this backend runs model `id`.
    pub fn serves(&self, id: &str) -> bool {
        self.specs.contains_key(id)
    }

    /// Stops every model server this backend started, resident or still
    /// starting (their `stop` commands first), and resolves when none of
    /// their processes remains.
    pub fn shutdown_all(&self) -> BackendFuture<()> {
        let running: Vec<(String, Server)> = self.state.borrow_mut().running.drain().collect();
        let starting: Vec<(i32, watch::Receiver<bool>)> = self
            .state
            .borrow()
            .keepers
            .iter()
            .map(|(pid, gone)| (*pid, gone.clone()))
            .collect();
        let specs = self.specs.clone();
        Box::pin(async move {
            let stops = running.into_iter().map(|(id, server)| {
                let spec = specs.get(&id).cloned();
                async move {
                    let stop_timeout = spec
                        .as_ref()
                        .map_or(Duration::from_secs(10), |s| s.stop_timeout);
                    if let Some(spec) = &spec {
                        run_stop_command(&id, spec).await;
                    }
                    server.stop(&id, stop_timeout).await
                }
            });
            let results = join_all(stops).await;
            // Servers still starting: their loads will see them exit.
            let waits = starting.into_iter().map(|(pid, mut gone)| async move {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
                let limit = Duration::from_secs(10) + KEEPER_MARGIN;
                let _ = tokio::time::timeout(limit, gone.wait_for(|g| *g)).await;
            });
            join_all(waits).await;
            results
                .into_iter()
                .collect::<Result<Vec<()>, _>>()
                .map(drop)
        })
    }

    /// Starts `spec`'s command under a keeper and waits for its pid.
    async fn start(&self, id: &str, spec: &ProcessSpec) -> Result<Server, BackendError> {
        let fail = |message: String| BackendError::new(format!("{id}: {message}"));
        if let Some(cwd) = &spec.cwd
            && !cwd.is_dir()
        {
            return Err(fail(format!(
                "working directory {} does not exist",
                cwd.display()
            )));
        }
        let program = keeper::program().map_err(fail)?;
        let mut command = std::process::Command::new(program);
        command
            .arg(KEEPER_ARG)
            .arg(std::process::id().to_string())
            .arg(spec.stop_timeout.as_millis().to_string())
            .arg("--")
            .args(&spec.command)
            .envs(&spec.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Its own group: a Ctrl-C at the terminal reaches the manager, which
        // stops its servers in order, not the servers directly.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        if let Some(cwd) = &spec.cwd {
            command.current_dir(cwd);
        }
        let mut child = spawn(command)
            .await
            .map_err(|e| fail(format!("cannot start the keeper: {e}")))?;
        let keeper_pid = Pid::from_raw(child.id() as i32);
        let pipes = child
            .stdout
            .take()
            .zip(child.stderr.take())
            .ok_or_else(|| fail("the keeper has no pipes".to_string()));
        let (stdout, stderr) = match pipes.and_then(|(out, err)| {
            let out = tokio::process::ChildStdout::from_std(out);
            let err = tokio::process::ChildStderr::from_std(err);
            out.and_then(|o| err.map(|e| (o, e)))
                .map_err(|e| fail(format!("cannot watch the keeper: {e}")))
        }) {
            Ok(pipes) => pipes,
            Err(e) => {
                let _ = kill(keeper_pid, Signal::SIGUSR1);
                actix::spawn(async move {
                    reap(&mut child).await;
                });
                return Err(e);
            }
        };
        let tail = Rc::new(RefCell::new(StderrTail::default()));
        collect_stderr(stderr, tail.clone());
        let mut reports = BufReader::new(stdout).lines();
        // The first report: the server's pid, or why it could not start.
        let first = tokio::time::timeout(spec.ready_timeout, reports.next_line()).await;
        let leader = match first {
            Ok(Ok(Some(line))) => match Report::parse(&line) {
                Some(Report::Started(pid)) => Ok(Pid::from_raw(pid)),
                Some(Report::Error(message)) => Err(fail(message)),
                _ => Err(fail(format!("the keeper said {line:?}"))),
            },
            Ok(_) => Err(fail(format!(
                "the keeper exited before starting the server; stderr:\n{}",
                tail.borrow().text()
            ))),
            Err(_) => Err(fail("the keeper did not start the server".to_string())),
        };
        let (exited_tx, exited) = watch::channel(None);
        let (gone_tx, gone) = watch::channel(false);
        self.state
            .borrow_mut()
            .keepers
            .insert(keeper_pid.as_raw(), gone.clone());
        let state = Rc::downgrade(&self.state);
        let model = id.to_string();
        let stderr_for_watch = tail.clone();
        actix::spawn(async move {
            while let Ok(Some(line)) = reports.next_line().await {
                match Report::parse(&line) {
                    Some(Report::Exit(status)) => {
                        if let Some(state) = state.upgrade() {
                            state
                                .borrow_mut()
                                .exits
                                .insert(model.clone(), status.clone());
                        }
                        let _ = exited_tx.send(Some(status));
                    }
                    Some(Report::Escalated(n)) => tracing::warn!(
                        model = %model,
                        processes = n,
                        "model server did not exit within stop_timeout after SIGTERM (a request may still be running); killed"
                    ),
                    _ => {}
                }
            }
            // Standard output closes when the keeper exits, after its tree.
            reap(&mut child).await;
            let _ = gone_tx.send(true);
            let Some(state) = state.upgrade() else { return };
            let mut state = state.borrow_mut();
            state.keepers.remove(&keeper_pid.as_raw());
            // A resident server that exits by itself is reported; one we
            // stopped, or one still starting, was already taken out.
            if state
                .running
                .get(&model)
                .is_some_and(|s| s.keeper == keeper_pid)
            {
                state.running.remove(&model);
                let ended = state
                    .exits
                    .get(&model)
                    .cloned()
                    .unwrap_or_else(|| "unknown status".to_string());
                let tail = stderr_for_watch.borrow().text();
                if let Some(notify) = state.notify.clone() {
                    drop(state);
                    notify(ModelExit {
                        model,
                        reason: format!("model server exited ({ended}); stderr:\n{tail}"),
                    });
                }
            }
        });
        let server_or_pid = leader.map(|leader| Server {
            keeper: keeper_pid,
            leader,
            exited,
            gone,
            stderr: tail,
        });
        if server_or_pid.is_err() {
            let _ = kill(keeper_pid, Signal::SIGUSR1);
        }
        server_or_pid
    }
}

/// Runs a model's `stop` command (argv, no shell), bounded by its
/// `stop_timeout`; a failure is logged with its stderr, never fatal: the
/// process tree is stopped next all the same.
async fn run_stop_command(id: &str, spec: &ProcessSpec) {
    let Some((program, args)) = spec.stop.split_first() else {
        return;
    };
    let mut command = std::process::Command::new(program);
    command
        .args(args)
        .envs(&spec.env)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(cwd) = spec.cwd.as_ref().filter(|c| c.is_dir()) {
        command.current_dir(cwd);
    }
    let mut child = match spawn(command).await {
        Ok(child) => child,
        Err(e) => {
            tracing::warn!(model = %id, command = ?spec.stop, error = %e, "stop command could not start");
            return;
        }
    };
    let pid = Pid::from_raw(child.id() as i32);
    let stderr = child
        .stderr
        .take()
        .and_then(|e| tokio::process::ChildStderr::from_std(e).ok());
    let finished = tokio::time::timeout(spec.stop_timeout, async {
        let mut text = String::new();
        if let Some(mut stderr) = stderr {
            let _ = stderr.read_to_string(&mut text).await;
        }
        (reap(&mut child).await, text)
    })
    .await;
    match finished {
        Ok((status, _)) if status == "exit status: 0" => {
            tracing::info!(model = %id, command = ?spec.stop, "stop command done");
        }
        Ok((status, stderr)) => {
            let mut tail = StderrTail::default();
            stderr.lines().for_each(|l| tail.push(l));
            tracing::warn!(model = %id, command = ?spec.stop, status = %status, stderr = %tail.text(), "stop command failed; stopping the process tree anyway");
        }
        Err(_) => {
            let _ = kill(pid, Signal::SIGKILL);
            tracing::warn!(model = %id, command = ?spec.stop, timeout = ?spec.stop_timeout, "stop command did not finish within stop_timeout; killed");
            actix::spawn(async move {
                reap(&mut child).await;
            });
        }
    }
}

/// What one readiness probe saw.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Probe {
    Ready,
    NotReady(String),
}

async fn probe(check: &ReadyCheck) -> Probe {
    match check {
        ReadyCheck::Tcp(addr) => match connect(addr).await {
            Ok(()) => Probe::Ready,
            Err(e) => Probe::NotReady(format!("tcp://{addr}: {e}")),
        },
        ReadyCheck::Http(url) => {
            let client = awc::Client::builder().timeout(PROBE_TIMEOUT).finish();
            match client.get(url).send().await {
                Ok(response) if response.status().is_success() => Probe::Ready,
                Ok(mut response) => {
                    let body = response.body().limit(4096).await.unwrap_or_default();
                    let body: String = String::from_utf8_lossy(&body)
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                        .chars()
                        .take(PROBE_BODY_CHARS)
                        .collect();
                    Probe::NotReady(format!("{url} answered HTTP {}: {body}", response.status()))
                }
                Err(e) => Probe::NotReady(format!("{url}: {e}")),
            }
        }
    }
}

/// A TCP connect with a timeout (an unreachable host must not hang a load).
async fn connect(addr: &str) -> Result<(), String> {
    match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
    }
}

impl Backend for ProcessBackend {
    fn load(&self, model: &ModelSpec) -> BackendFuture<()> {
        let id = model.id.clone();
        let spec = self.specs.get(&id).cloned();
        let this = self.clone();
        Box::pin(async move {
            let spec = spec
                .ok_or_else(|| BackendError::new(format!("{id} is not a process-backed model")))?;
            // Whoever answers on the port now is not our server.
            if connect(&spec.ready.address()).await.is_ok() {
                return Err(BackendError::new(format!(
                    "{id}: port {} is already in use by another process; nothing was started",
                    spec.ready.port()
                )));
            }
            // If this future is dropped (the manager's own timeout), the
            // server is dropped with it, which kills its tree.
            let server = this.start(&id, &spec).await?;
            let started = Instant::now();
            loop {
                if server.has_exited().is_some() {
                    return Err(exited_early(&id, server).await);
                }
                let seen = probe(&spec.ready).await;
                // Ready only if our server is still there after the answer.
                if seen == Probe::Ready {
                    if server.has_exited().is_some() {
                        return Err(exited_early(&id, server).await);
                    }
                    break;
                }
                if started.elapsed() >= spec.ready_timeout {
                    let Probe::NotReady(last) = seen else {
                        unreachable!("ready breaks the loop")
                    };
                    let tail = server.stderr_tail();
                    let mut server = server;
                    server.signal_keeper(Signal::SIGUSR1);
                    server.wait_gone(KEEPER_MARGIN).await;
                    return Err(BackendError::timeout(
                        format!(
                            "{id}: model server not ready within {:?}; last probe: {last}; stderr:\n{tail}",
                            spec.ready_timeout
                        ),
                        spec.ready_timeout,
                    ));
                }
                actix::clock::sleep(READY_POLL).await;
            }
            tracing::info!(model = %id, pid = server.leader.as_raw(), "model server ready");
            this.state.borrow_mut().running.insert(id, server);
            Ok(())
        })
    }

    fn unload(&self, id: &str) -> BackendFuture<()> {
        let server = self.state.borrow_mut().running.remove(id);
        let spec = self.specs.get(id).cloned();
        let id = id.to_string();
        Box::pin(async move {
            let Some(server) = server else {
                return Ok(());
            };
            let stop_timeout = spec
                .as_ref()
                .map_or(Duration::from_secs(10), |s| s.stop_timeout);
            if let Some(spec) = &spec {
                run_stop_command(&id, spec).await;
            }
            server.stop(&id, stop_timeout).await
        })
    }

    fn loaded(&self) -> BackendFuture<Vec<String>> {
        let ids = self.state.borrow().running.keys().cloned().collect();
        Box::pin(async move { Ok(ids) })
    }

    /// Kills every model server this backend started (its restart must not
    /// leave orphans).
    fn reset(&self) {
        let servers: Vec<Server> = self
            .state
            .borrow_mut()
            .running
            .drain()
            .map(|(_, s)| s)
            .collect();
        drop(servers);
    }

    fn watch(&self, notify: ExitNotifier) {
        self.state.borrow_mut().notify = Some(notify);
    }

    /// Stops every server at once, resident or still starting (see
    /// [`ProcessBackend::shutdown_all`]).
    fn shutdown(self: Rc<Self>) -> BackendFuture<()> {
        self.shutdown_all()
    }
}

/// The error of a server that exited before it was ready, once its tree is
/// gone (so its stderr is complete and its memory free).
async fn exited_early(id: &str, mut server: Server) -> BackendError {
    server.wait_gone(KEEPER_MARGIN).await;
    let status = server
        .exited
        .borrow()
        .clone()
        .unwrap_or_else(|| "unknown status".to_string());
    BackendError::new(format!(
        "{id}: model server exited before it was ready ({status}); stderr:\n{}",
        server.stderr_tail()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_urls_are_parsed_with_their_port() {
        let http = ReadyCheck::parse("http://127.0.0.1:8081/health").unwrap();
        assert_eq!(http.address(), "127.0.0.1:8081");
        assert_eq!(http.port(), 8081);
        let tcp = ReadyCheck::parse("tcp://localhost:9000").unwrap();
        assert_eq!(tcp, ReadyCheck::Tcp("localhost:9000".into()));
        for bad in [
            "http://127.0.0.1/health",
            "tcp://:80",
            "tcp://host",
            "ftp://h:1/",
            "127.0.0.1:80",
            "http://h:99999/",
            "tcp://h:1/path",
        ] {
            assert!(ReadyCheck::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn the_stderr_tail_skips_blank_and_repeated_lines() {
        let mut tail = StderrTail::default();
        for line in [
            "loading",
            "",
            "  ",
            "50%",
            "50%",
            "50%",
            "error: oom",
            "50%",
        ] {
            tail.push(line);
        }
        assert_eq!(tail.text(), "loading\n50%\nerror: oom\n50%");
        let mut long = StderrTail::default();
        for i in 0..(STDERR_LINES + 5) {
            long.push(&i.to_string());
        }
        assert_eq!(long.0.len(), STDERR_LINES);
        assert_eq!(long.0.front().map(String::as_str), Some("5"));
        assert_eq!(StderrTail::default().text(), "(no stderr)");
    }
}
