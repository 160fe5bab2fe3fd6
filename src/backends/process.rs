//! The process backend: each model is a model-server process (llama.cpp's
//! `llama-server`, whisper.cpp's server, Piper behind a small HTTP front,
//! ...). Loading spawns the command (an argv array, never a shell) and
//! waits until it is ready; unloading stops it.
//!
//! - Ready: an `http://127.0.0.1:PORT/PATH` URL answering 2xx, or
//!   `tcp://HOST:PORT` accepting a connection, within `ready_timeout`. If
//!   the process exits first: `backend_failed` with its exit status and the
//!   last lines of its stderr. If ready never comes: `timeout`, and the
//!   process group is killed.
//! - Stop: SIGTERM to the process group, up to `stop_timeout` to exit, then
//!   SIGKILL.
//! - No child outlives the manager: each child leads its own process group,
//!   is killed (the whole group) when its handle is dropped (normal exit,
//!   a load abandoned on timeout, a backend restart), and on Linux gets
//!   SIGKILL from the kernel if the manager itself dies.
//! - A model server that exits while resident is noticed and reported
//!   through [`Backend::watch`].

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::rc::Rc;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::watch;
use tokio::time::Instant;
use vram_actors::{Backend, BackendError, BackendFuture, ExitNotifier, ModelExit, ModelSpec};

/// How many lines of a child's stderr are kept for error messages.
const STDERR_LINES: usize = 20;
/// How often readiness is checked while a server starts.
const READY_POLL: Duration = Duration::from_millis(50);

/// How to tell that a model server is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadyCheck {
    /// An HTTP GET of this URL answers 2xx.
    Http(String),
    /// A TCP connection to this `host:port` is accepted.
    Tcp(String),
}

impl ReadyCheck {
    /// Parses `http://127.0.0.1:PORT/PATH` or `tcp://HOST:PORT`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(rest) = text.strip_prefix("tcp://") {
            if rest
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
            {
                return Ok(Self::Tcp(rest.to_string()));
            }
            return Err(format!("{text:?} is not tcp://HOST:PORT"));
        }
        if let Some(rest) = text.strip_prefix("http://") {
            let authority = rest.split('/').next().unwrap_or_default();
            if authority
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
            {
                return Ok(Self::Http(text.to_string()));
            }
            return Err(format!("{text:?} is not http://HOST:PORT/PATH"));
        }
        Err(format!(
            "{text:?} is neither an http:// URL nor tcp://HOST:PORT"
        ))
    }
}

/// One process-backed model's command and lifecycle settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSpec {
    /// Program and arguments.
    pub command: Vec<String>,
    /// Extra environment variables.
    pub env: BTreeMap<String, String>,
    /// Working directory (the manager's when `None`).
    pub cwd: Option<PathBuf>,
    /// How to tell it is ready.
    pub ready: ReadyCheck,
    /// How long it may take to become ready.
    pub ready_timeout: Duration,
    /// How long it may take to exit after SIGTERM before SIGKILL.
    pub stop_timeout: Duration,
}

/// A running model server. Dropping it kills its process group.
struct Child {
    pid: Pid,
    /// The exit status once the process has exited.
    exited: watch::Receiver<Option<ExitStatus>>,
    stderr: Rc<RefCell<VecDeque<String>>>,
}

impl Child {
    fn has_exited(&self) -> Option<ExitStatus> {
        *self.exited.borrow()
    }

    fn signal(&self, signal: Signal) {
        if self.has_exited().is_none() {
            // The group may already be gone; that is what we want anyway.
            let _ = killpg(self.pid, signal);
        }
    }

    /// Waits up to `limit` for the process to exit.
    async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let waited = tokio::time::timeout(limit, self.exited.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(|r| r.ok().and_then(|status| *status));
        waited.or_else(|| self.has_exited())
    }

    fn stderr_tail(&self) -> String {
        tail_text(&self.stderr)
    }
}

/// The kept lines of a child's stderr, for an error message.
fn tail_text(lines: &RefCell<VecDeque<String>>) -> String {
    let lines = lines.borrow();
    if lines.is_empty() {
        "(no stderr)".to_string()
    } else {
        lines.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.signal(Signal::SIGKILL);
    }
}

#[derive(Default)]
struct State {
    running: HashMap<String, Child>,
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
            .map(|(id, c)| (id.clone(), c.pid.as_raw()))
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

    fn spawn(&self, id: &str, spec: &ProcessSpec) -> Result<Child, BackendError> {
        let Some((program, args)) = spec.command.split_first() else {
            return Err(BackendError::new(format!("{id}: empty command")));
        };
        let mut command = tokio::process::Command::new(program);
        command
            .args(args)
            .envs(&spec.env)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(cwd) = &spec.cwd {
            command.current_dir(cwd);
        }
        #[cfg(target_os = "linux")]
        // SAFETY: between fork and exec only async-signal-safe calls are
        // allowed; prctl(PR_SET_PDEATHSIG) is a single system call.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let mut child = command
            .spawn()
            .map_err(|e| BackendError::new(format!("{id}: cannot start {program:?}: {e}")))?;
        let pid = child
            .id()
            .map(|p| Pid::from_raw(p as i32))
            .ok_or_else(|| BackendError::new(format!("{id}: the process exited at once")))?;
        let stderr = Rc::new(RefCell::new(VecDeque::new()));
        if let Some(pipe) = child.stderr.take() {
            let tail = stderr.clone();
            actix::spawn(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut tail = tail.borrow_mut();
                    if tail.len() == STDERR_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
            });
        }
        let (tx, exited) = watch::channel(None);
        let state = Rc::downgrade(&self.state);
        let model = id.to_string();
        let stderr_for_watch = stderr.clone();
        actix::spawn(async move {
            let status = child.wait().await.ok();
            let _ = tx.send(status);
            // A resident server that exits by itself is reported; one we
            // stopped, or one still starting, was already taken out.
            let Some(state) = state.upgrade() else { return };
            let mut state = state.borrow_mut();
            let ended = status.map_or("unknown status".to_string(), |s| s.to_string());
            state.exits.insert(model.clone(), ended.clone());
            if state.running.get(&model).is_some_and(|c| c.pid == pid) {
                state.running.remove(&model);
                let tail = tail_text(&stderr_for_watch);
                if let Some(notify) = state.notify.clone() {
                    drop(state);
                    notify(ModelExit {
                        model,
                        reason: format!("model server exited ({ended}); stderr:\n{tail}"),
                    });
                }
            }
        });
        Ok(Child {
            pid,
            exited,
            stderr,
        })
    }
}

async fn is_ready(check: &ReadyCheck) -> bool {
    match check {
        ReadyCheck::Tcp(addr) => tokio::net::TcpStream::connect(addr).await.is_ok(),
        ReadyCheck::Http(url) => {
            let client = awc::Client::builder()
                .timeout(Duration::from_secs(1))
                .finish();
            match client.get(url).send().await {
                Ok(response) => response.status().is_success(),
                Err(_) => false,
            }
        }
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
            // If this future is dropped (the manager's own timeout), the
            // child is dropped with it, which kills its process group.
            let mut child = this.spawn(&id, &spec)?;
            let started = Instant::now();
            loop {
                if let Some(status) = child.has_exited() {
                    return Err(BackendError::new(format!(
                        "{id}: model server exited before it was ready ({status}); stderr:\n{}",
                        child.stderr_tail()
                    )));
                }
                if is_ready(&spec.ready).await {
                    break;
                }
                if started.elapsed() >= spec.ready_timeout {
                    child.signal(Signal::SIGKILL);
                    child.wait_exit(Duration::from_secs(5)).await;
                    return Err(BackendError::timeout(
                        format!(
                            "{id}: model server not ready within {:?}; killed",
                            spec.ready_timeout
                        ),
                        spec.ready_timeout,
                    ));
                }
                actix::clock::sleep(READY_POLL).await;
            }
            tracing::info!(model = %id, pid = child.pid.as_raw(), "model server ready");
            this.state.borrow_mut().running.insert(id, child);
            Ok(())
        })
    }

    fn unload(&self, id: &str) -> BackendFuture<()> {
        let child = self.state.borrow_mut().running.remove(id);
        let stop_timeout = self
            .specs
            .get(id)
            .map_or(Duration::from_secs(10), |s| s.stop_timeout);
        let id = id.to_string();
        Box::pin(async move {
            let Some(mut child) = child else {
                return Ok(());
            };
            child.signal(Signal::SIGTERM);
            if child.wait_exit(stop_timeout).await.is_none() {
                tracing::warn!(model = %id, pid = child.pid.as_raw(), "model server ignored SIGTERM; killing it");
                child.signal(Signal::SIGKILL);
                if child.wait_exit(Duration::from_secs(5)).await.is_none() {
                    return Err(BackendError::new(format!(
                        "{id}: model server survived SIGKILL"
                    )));
                }
            }
            Ok(())
        })
    }

    fn loaded(&self) -> BackendFuture<Vec<String>> {
        let ids = self.state.borrow().running.keys().cloned().collect();
        Box::pin(async move { Ok(ids) })
    }

    /// Kills every model server this backend started (its restart must not
    /// leave orphans).
    fn reset(&self) {
        let children: Vec<Child> = self
            .state
            .borrow_mut()
            .running
            .drain()
            .map(|(_, c)| c)
            .collect();
        drop(children);
    }

    fn watch(&self, notify: ExitNotifier) {
        self.state.borrow_mut().notify = Some(notify);
    }
}
