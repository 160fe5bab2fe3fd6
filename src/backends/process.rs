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
use std::collections::{BTreeMap, HashMap, HashSet};
use std::rc::Rc;
use std::time::Duration;

use futures::future::join_all;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::sync::watch;
use tokio::time::Instant;
use vram_actors::{Backend, BackendError, BackendFuture, ExitNotifier, ModelExit, ModelSpec};

use super::server::{Hooks, KEEPER_MARGIN, Server, run_stop_command};
pub use super::spec::{ProcessSpec, ReadyCheck};

/// How often readiness is checked while a server starts.
const READY_POLL: Duration = Duration::from_millis(50);
/// How long one readiness probe (connect, or HTTP request) may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How much of an HTTP probe's answer is quoted in an error.
const PROBE_BODY_CHARS: usize = 120;

#[derive(Default)]
struct State {
    running: HashMap<String, Server>,
    /// Every keeper not yet gone, loading or resident (keeper pid -> model
    /// and whether it is gone), for shutdown.
    keepers: HashMap<i32, (String, watch::Receiver<bool>)>,
    notify: Option<ExitNotifier>,
    /// How each model's last server process ended, e.g.
    /// "signal: 15 (SIGTERM)".
    exits: HashMap<String, String>,
    /// The models whose server was put to sleep (`park`) and not woken
    /// since; only those still in `running` count.
    asleep: HashSet<String>,
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

    /// POSTs the URL `pick` finds in `id`'s spec, if its server runs;
    /// fails on anything but a 2xx answer.
    fn post_to(
        &self,
        id: &str,
        pick: impl Fn(&ProcessSpec) -> Option<String>,
        what: &'static str,
    ) -> BackendFuture<()> {
        let url = self.specs.get(id).and_then(pick);
        let running = self.state.borrow().running.contains_key(id);
        let id = id.to_string();
        Box::pin(async move {
            let Some(url) = url else {
                return Err(BackendError::new(format!("{id} has no {what} URL")));
            };
            if !running {
                return Err(BackendError::new(format!("{id} has no server running")));
            }
            let answer = awc::Client::builder()
                .timeout(Duration::from_secs(600))
                .finish()
                .post(&url)
                .send()
                .await
                .map_err(|e| BackendError::new(format!("{what} {id}: POST {url}: {e}")))?;
            if answer.status().is_success() {
                Ok(())
            } else {
                Err(BackendError::new(format!(
                    "{what} {id}: POST {url} answered {}",
                    answer.status()
                )))
            }
        })
    }

    /// [`ProcessBackend::post_to`] for a sleep (`asleep`) or a wake: a
    /// server counts as asleep once its sleep succeeded, and no longer from
    /// the moment a wake starts.
    fn post_then(
        &self,
        id: &str,
        pick: impl Fn(&ProcessSpec) -> Option<String>,
        what: &'static str,
        asleep: bool,
    ) -> BackendFuture<()> {
        let post = self.post_to(id, pick, what);
        if !asleep {
            // Waking: it may take its whole size back at any moment, so
            // from now on it no longer counts as asleep (nor after a wake
            // that fails: nothing says it still sleeps).
            self.state.borrow_mut().asleep.remove(id);
        }
        let (state, id) = (self.state.clone(), id.to_string());
        Box::pin(async move {
            post.await?;
            let mut state = state.borrow_mut();
            if asleep && state.running.contains_key(&id) {
                state.asleep.insert(id);
            }
            Ok(())
        })
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
    /// starting (their `stop` commands first), all at once, and resolves
    /// when none of their processes remains.
    pub fn shutdown_all(&self) -> BackendFuture<()> {
        let running: Vec<(String, Server)> = self.state.borrow_mut().running.drain().collect();
        let resident: Vec<i32> = running.iter().map(|(_, s)| s.keeper.as_raw()).collect();
        // Servers still starting: their loads see them exit.
        let starting: Vec<(i32, String, watch::Receiver<bool>)> = self
            .state
            .borrow()
            .keepers
            .iter()
            .filter(|(pid, (_, gone))| !resident.contains(pid) && !*gone.borrow())
            .map(|(pid, (id, gone))| (*pid, id.clone(), gone.clone()))
            .collect();
        let mut stops: Vec<BackendFuture<()>> = Vec::new();
        for (id, server) in running {
            let limit = self.stop_timeout(&id);
            stops.push(Box::pin(async move { server.stop(limit).await }));
        }
        for (pid, id, mut gone) in starting {
            let limit = self.stop_timeout(&id) + KEEPER_MARGIN;
            let spec = self.specs.get(id.as_str()).cloned();
            stops.push(Box::pin(async move {
                if let Some(spec) = &spec {
                    run_stop_command(&id, spec).await;
                }
                if !*gone.borrow() {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
                }
                let _ = tokio::time::timeout(limit, gone.wait_for(|g| *g)).await;
                Ok(())
            }));
        }
        Box::pin(async move {
            join_all(stops)
                .await
                .into_iter()
                .collect::<Result<Vec<()>, _>>()
                .map(drop)
        })
    }

    /// Model `id`'s `stop_timeout`.
    fn stop_timeout(&self, id: &str) -> Duration {
        self.specs
            .get(id)
            .map_or(Duration::from_secs(10), |s| s.stop_timeout)
    }

    /// Starts `spec`'s command under a keeper, tracked from its first
    /// moment (for shutdown) to its last (a resident server that exits by
    /// itself is reported).
    async fn start(&self, id: &str, spec: &ProcessSpec) -> Result<Server, BackendError> {
        let on_exit = {
            let (state, model) = (Rc::downgrade(&self.state), id.to_string());
            move |status: &str| {
                if let Some(state) = state.upgrade() {
                    let mut state = state.borrow_mut();
                    state.exits.insert(model.clone(), status.to_string());
                }
            }
        };
        let on_started = {
            let (state, model) = (Rc::downgrade(&self.state), id.to_string());
            move |keeper: Pid, gone: watch::Receiver<bool>| {
                if let Some(state) = state.upgrade() {
                    let mut state = state.borrow_mut();
                    state.keepers.insert(keeper.as_raw(), (model.clone(), gone));
                }
            }
        };
        let on_gone = {
            let (state, model) = (Rc::downgrade(&self.state), id.to_string());
            move |keeper: Pid, ended: String, tail: String| {
                let Some(state) = state.upgrade() else { return };
                let mut state = state.borrow_mut();
                state.keepers.remove(&keeper.as_raw());
                // A resident server that exits by itself is reported; one
                // we stopped, or one still starting, was already taken out.
                if state.running.get(&model).is_none_or(|s| s.keeper != keeper) {
                    return;
                }
                state.running.remove(&model);
                if let Some(notify) = state.notify.clone() {
                    drop(state);
                    notify(ModelExit {
                        model,
                        reason: format!("model server exited ({ended}); stderr:\n{tail}"),
                    });
                }
            }
        };
        let hooks = Hooks {
            started: Box::new(on_started),
            exited: Box::new(on_exit),
            gone: Box::new(on_gone),
        };
        Server::start(id, spec, hooks).await
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
        let spec = self.specs.get(id.as_str()).cloned();
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
                    server.kill().await;
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
            let mut state = this.state.borrow_mut();
            state.asleep.remove(id.as_str());
            state.running.insert(id.to_string(), server);
            Ok(())
        })
    }

    fn unload(&self, id: &str) -> BackendFuture<()> {
        let server = {
            let mut state = self.state.borrow_mut();
            state.asleep.remove(id);
            state.running.remove(id)
        };
        let stop_timeout = self.stop_timeout(id);
        Box::pin(async move {
            match server {
                Some(server) => server.stop(stop_timeout).await,
                None => Ok(()),
            }
        })
    }

    /// POSTs the model's `sleep` URL: its server leaves the card and
    /// keeps running.
    fn park(&self, id: &str) -> BackendFuture<()> {
        self.post_then(id, |spec| spec.sleep.clone(), "sleep", true)
    }

    /// POSTs the model's `wake` URL.
    fn wake(&self, id: &str) -> BackendFuture<()> {
        self.post_then(id, |spec| spec.wake.clone(), "wake", false)
    }

    fn loaded(&self) -> BackendFuture<Vec<String>> {
        let ids = self.state.borrow().running.keys().cloned().collect();
        Box::pin(async move { Ok(ids) })
    }

    /// The servers put to sleep and not woken since (a server being put to
    /// sleep counts once its sleep succeeded; one being woken, or whose
    /// wake failed, does not).
    fn parked(&self) -> BackendFuture<Vec<String>> {
        let state = self.state.borrow();
        let mut ids: Vec<String> = (state.asleep.iter())
            .filter(|id| state.running.contains_key(*id))
            .cloned()
            .collect();
        ids.sort();
        Box::pin(std::future::ready(Ok(ids)))
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
    server.wait_until_gone().await;
    let status = server
        .exit_status()
        .unwrap_or_else(|| "unknown status".to_string());
    let tail = server.stderr_tail();
    // Its `stop` command still runs (a container may be up).
    server.kill().await;
    BackendError::new(format!(
        "{id}: model server exited before it was ready ({status}); stderr:\n{tail}"
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
}
