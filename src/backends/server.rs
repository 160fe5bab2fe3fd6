//! One model server under its keeper (see [`crate::keeper`]): starting it
//! from the long-lived spawner thread, watching the keeper's reports and
//! its exit, stopping or killing the tree, and the model's `stop` command.
//!
//! Nothing here may leak a process: a keeper whose load is abandoned at any
//! point (before the spawner answers, before the server's pid is known,
//! while it starts) is killed; a keeper that is itself killed takes its
//! process group with it; a `stop` command's leftovers are killed with its
//! process group.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, Read};
use std::process::Stdio;
use std::rc::Rc;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{oneshot, watch};
use vram_actors::BackendError;

use super::spec::ProcessSpec;
use crate::keeper::{self, KEEPER_ARG, Report};

/// How many lines of a child's stderr are kept for error messages.
const STDERR_LINES: usize = 20;
/// The longest stderr line kept (a binary blob is not a message).
const STDERR_LINE_BYTES: usize = 4096;
/// Time a keeper gets beyond `stop_timeout` to SIGKILL and reap its tree.
pub(crate) const KEEPER_MARGIN: Duration = Duration::from_secs(5);

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
                    if let Err(Ok(mut child)) = reply.send(command.spawn()) {
                        // Nobody waits for it any more (the load was
                        // abandoned): the keeper kills whatever it started.
                        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGUSR1);
                        let _ = child.wait();
                    }
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

/// Waits for `child` to exit without blocking the arbiter.
async fn reap(child: &mut std::process::Child) -> io::Result<std::process::ExitStatus> {
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        actix::clock::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

// -------------------------------------------------------------- stderr tail

/// The last lines of a server's stderr, without blank lines or a line that
/// repeats the one before (a progress bar, a retry loop).
#[derive(Debug, Default)]
pub(crate) struct StderrTail(VecDeque<String>);

impl StderrTail {
    /// Keeps `line` (lossily decoded, cut to a sane length).
    pub(crate) fn push(&mut self, line: &[u8]) {
        let line = String::from_utf8_lossy(&line[..line.len().min(STDERR_LINE_BYTES)]);
        let line = line.trim_end();
        if line.trim().is_empty() || self.0.back().is_some_and(|last| last == line) {
            return;
        }
        if self.0.len() == STDERR_LINES {
            self.0.pop_front();
        }
        self.0.push_back(line.to_string());
    }

    /// The kept lines, or "(no stderr)".
    pub(crate) fn text(&self) -> String {
        if self.0.is_empty() {
            "(no stderr)".to_string()
        } else {
            self.0.iter().cloned().collect::<Vec<_>>().join("\n")
        }
    }
}

/// Keeps the tail of `pipe` in `tail` until it closes. Reads bytes, not
/// text: a server that writes invalid UTF-8 must not lose its reader (its
/// next write would die of SIGPIPE).
fn collect_stderr(pipe: impl AsyncRead + Unpin + 'static, tail: Rc<RefCell<StderrTail>>) {
    actix::spawn(async move {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line).await {
                Ok(0) => return,
                Ok(_) => tail.borrow_mut().push(&line),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    });
}

// ------------------------------------------------------------------ server

/// What the backend is told about a keeper it started.
pub(crate) struct Hooks {
    /// The keeper was started (before its server is known): who it is and
    /// a watch that turns true when it is gone.
    pub(crate) started: Box<dyn FnOnce(Pid, watch::Receiver<bool>)>,
    /// The server exited with this status (the tree may still be stopping).
    pub(crate) exited: Box<dyn Fn(&str)>,
    /// The keeper is gone, and its tree with it: how the server ended, and
    /// the stderr tail.
    pub(crate) gone: Box<dyn FnOnce(Pid, String, String)>,
}

/// Sends SIGUSR1 (kill the tree at once) to a keeper unless disarmed.
struct KillOnDrop(Option<Pid>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(keeper) = self.0 {
            let _ = kill(keeper, Signal::SIGUSR1);
        }
    }
}

/// A running model server under its keeper. Dropping it kills the tree
/// (and runs the model's `stop` command, off the arbiter).
pub(crate) struct Server {
    /// The model.
    id: String,
    /// The keeper's process id (the manager's child).
    pub(crate) keeper: Pid,
    /// The model server's process id (the keeper's child).
    pub(crate) leader: Pid,
    /// The server's exit status once it has exited.
    exited: watch::Receiver<Option<String>>,
    /// True once the keeper has exited: no process of the tree remains.
    gone: watch::Receiver<bool>,
    stderr: Rc<RefCell<StderrTail>>,
    /// Its spec, while the `stop` command (if any) is still to run.
    spec: Option<ProcessSpec>,
}

impl Server {
    /// Starts `spec`'s command under a keeper and waits for its pid. If
    /// this future is dropped at any point, nothing it started survives.
    pub(crate) async fn start(
        id: &str,
        spec: &ProcessSpec,
        hooks: Hooks,
    ) -> Result<Server, BackendError> {
        let fail = |message: String| BackendError::new(format!("{id}: {message}"));
        if let Some(cwd) = &spec.cwd
            && !cwd.is_dir()
        {
            return Err(fail(format!(
                "cwd {:?} (its working directory) does not exist or is not a directory",
                cwd.display().to_string()
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
        let mut guard = KillOnDrop(Some(keeper_pid));
        let pipes = child.stdout.take().zip(child.stderr.take());
        let pipes = pipes.and_then(|(out, err)| {
            let out = tokio::process::ChildStdout::from_std(out).ok()?;
            let err = tokio::process::ChildStderr::from_std(err).ok()?;
            Some((out, err))
        });
        let tail = Rc::new(RefCell::new(StderrTail::default()));
        let (exited_tx, exited) = watch::channel(None);
        let (gone_tx, gone) = watch::channel(false);
        let (first_tx, first) = oneshot::channel();
        let Some((stdout, stderr)) = pipes else {
            // The guard kills the keeper; the reaper below collects it.
            actix::spawn(async move {
                let _ = reap(&mut child).await;
            });
            return Err(fail("cannot watch the keeper's pipes".to_string()));
        };
        collect_stderr(stderr, tail.clone());
        let Hooks {
            started,
            exited: on_exit,
            gone: on_gone,
        } = hooks;
        started(keeper_pid, gone.clone());
        let watched_tail = tail.clone();
        let model = id.to_string();
        // The watcher owns the keeper from now on: it reads its reports,
        // reaps it, and kills its group if it was itself killed.
        actix::spawn(async move {
            let mut reports = BufReader::new(stdout).lines();
            let mut first_tx = Some(first_tx);
            let mut ended = None;
            while let Ok(Some(line)) = reports.next_line().await {
                match Report::parse(&line) {
                    Some(report @ (Report::Started(_) | Report::Error(_))) => {
                        if let Some(tx) = first_tx.take() {
                            let _ = tx.send(report);
                        }
                    }
                    Some(Report::Exit(status)) => {
                        on_exit(&status);
                        ended = Some(status.clone());
                        let _ = exited_tx.send(Some(status));
                    }
                    Some(Report::Escalated(n)) => tracing::warn!(
                        model = %model,
                        processes = n,
                        "model server did not exit within stop_timeout after SIGTERM (a request may still be running); killed"
                    ),
                    Some(Report::Killed(n)) => {
                        tracing::info!(model = %model, processes = n, "model server killed")
                    }
                    None => {}
                }
            }
            // Standard output closes when the keeper exits, after its tree.
            let status = reap(&mut child).await;
            let killed = status.as_ref().map_or(true, |s| s.code().is_none());
            if killed {
                // The keeper itself was killed (SIGKILL, the OOM killer):
                // its server dies by its parent-death signal; anything
                // else of the tree still in its group goes now.
                let _ = killpg(keeper_pid, Signal::SIGKILL);
                let how = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                ended = Some(format!(
                    "its keeper was killed ({how}); the tree was killed"
                ));
            }
            drop(first_tx);
            let _ = gone_tx.send(true);
            let ended = ended.unwrap_or_else(|| "unknown status".to_string());
            on_gone(keeper_pid, ended, watched_tail.borrow().text());
        });
        // The first report: the server's pid, or why it could not start.
        let leader = match tokio::time::timeout(spec.ready_timeout, first).await {
            Ok(Ok(Report::Started(pid))) => Pid::from_raw(pid),
            Ok(Ok(Report::Error(message))) => return Err(fail(message)),
            Ok(_) => {
                return Err(fail(format!(
                    "the keeper exited before starting the server; stderr:\n{}",
                    tail.borrow().text()
                )));
            }
            Err(_) => return Err(fail("the keeper did not start the server".to_string())),
        };
        guard.0 = None;
        Ok(Server {
            id: id.to_string(),
            keeper: keeper_pid,
            leader,
            exited,
            gone,
            stderr: tail,
            spec: (!spec.stop.is_empty()).then(|| spec.clone()),
        })
    }

    /// The server's exit status, if it has exited. Checks the process
    /// table too: the keeper's report may be a moment behind.
    pub(crate) fn has_exited(&self) -> Option<String> {
        if let Some(status) = self.exited.borrow().clone() {
            return Some(status);
        }
        (!keeper::is_running(self.leader)).then(|| "exited".to_string())
    }

    /// The server's exit status as the keeper reported it.
    pub(crate) fn exit_status(&self) -> Option<String> {
        self.exited.borrow().clone()
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

    /// Waits (a bounded while) for the whole tree to be gone, e.g. after
    /// its server exited by itself.
    pub(crate) async fn wait_until_gone(&mut self) {
        self.wait_gone(KEEPER_MARGIN).await;
    }

    /// Runs the `stop` command (once), then SIGTERM to the tree,
    /// `stop_timeout`, SIGKILL; resolves when no process of it remains.
    pub(crate) async fn stop(mut self, stop_timeout: Duration) -> Result<(), BackendError> {
        if let Some(spec) = self.spec.take() {
            run_stop_command(&self.id, &spec).await;
        }
        self.signal_keeper(Signal::SIGTERM);
        if self.wait_gone(stop_timeout + KEEPER_MARGIN).await {
            return Ok(());
        }
        tracing::error!(model = %self.id, keeper = self.keeper.as_raw(), "keeper did not finish; killing its tree now");
        self.signal_keeper(Signal::SIGUSR1);
        if self.wait_gone(KEEPER_MARGIN).await {
            return Ok(());
        }
        Err(BackendError::new(format!(
            "{}: model server's processes survived SIGKILL",
            self.id
        )))
    }

    /// Runs the `stop` command (once), kills the tree at once and waits
    /// for it to be gone (a load that cannot go on).
    pub(crate) async fn kill(mut self) {
        if let Some(spec) = self.spec.take() {
            run_stop_command(&self.id, &spec).await;
        }
        self.signal_keeper(Signal::SIGUSR1);
        self.wait_gone(KEEPER_MARGIN).await;
    }

    /// The last lines of the server's stderr.
    pub(crate) fn stderr_tail(&self) -> String {
        self.stderr.borrow().text()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.signal_keeper(Signal::SIGUSR1);
        if let Some(spec) = self.spec.take() {
            // A server that is not a descendant (a container) needs its
            // stop command even when the load was abandoned; it runs on a
            // thread of its own, so dropping never blocks.
            let id = self.id.clone();
            std::thread::spawn(move || stop_command(&id, &spec));
        }
    }
}

/// Runs a model's `stop` command (argv, no shell), bounded by its
/// `stop_timeout`, on a thread of its own; a failure is logged with its
/// stderr, never fatal: the process tree is stopped next all the same.
pub(crate) async fn run_stop_command(id: &str, spec: &ProcessSpec) {
    if spec.stop.is_empty() {
        return;
    }
    let (tx, rx) = oneshot::channel();
    let (id, spec) = (id.to_string(), spec.clone());
    std::thread::spawn(move || {
        stop_command(&id, &spec);
        let _ = tx.send(());
    });
    let _ = rx.await;
}

/// The `stop` command, blocking: started in a process group of its own,
/// waited for up to `stop_timeout`, and its group killed afterwards (what it
/// left running in the background goes with it).
fn stop_command(id: &str, spec: &ProcessSpec) {
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
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    if let Some(cwd) = spec.cwd.as_ref().filter(|c| c.is_dir()) {
        command.current_dir(cwd);
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            tracing::warn!(model = %id, command = ?spec.stop, error = %e, "stop command could not start");
            return;
        }
    };
    let group = Pid::from_raw(child.id() as i32);
    let tail = Arc::new(Mutex::new(Vec::new()));
    let (read_tx, read_rx) = mpsc::channel();
    if let Some(mut stderr) = child.stderr.take() {
        let tail = tail.clone();
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = stderr.read_to_end(&mut bytes);
            if let Ok(mut tail) = tail.lock() {
                *tail = bytes;
            }
            let _ = read_tx.send(());
        });
    }
    let deadline = Instant::now() + spec.stop_timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => break None,
        }
    };
    let _ = killpg(group, Signal::SIGKILL);
    if status.is_none() {
        let _ = child.wait();
    }
    // The group is gone, so stderr closes; a stray that left the group
    // does not hold the message back for long.
    let _ = read_rx.recv_timeout(Duration::from_millis(200));
    let mut lines = StderrTail::default();
    if let Ok(bytes) = tail.lock() {
        bytes.split(|b| *b == b'\n').for_each(|l| lines.push(l));
    }
    match status {
        Some(status) if status.success() => {
            tracing::info!(model = %id, command = ?spec.stop, "stop command done");
        }
        Some(status) => {
            tracing::warn!(model = %id, command = ?spec.stop, status = %status, stderr = %lines.text(), "stop command failed; stopping the process tree anyway");
        }
        None => {
            tracing::warn!(model = %id, command = ?spec.stop, timeout = ?spec.stop_timeout, stderr = %lines.text(), "stop command did not finish within stop_timeout; killed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            tail.push(line.as_bytes());
        }
        assert_eq!(tail.text(), "loading\n50%\nerror: oom\n50%");
        let mut long = StderrTail::default();
        for i in 0..(STDERR_LINES + 5) {
            long.push(i.to_string().as_bytes());
        }
        assert_eq!(long.0.len(), STDERR_LINES);
        assert_eq!(long.0.front().map(String::as_str), Some("5"));
        assert_eq!(StderrTail::default().text(), "(no stderr)");
    }

    #[test]
    fn the_stderr_tail_keeps_invalid_utf8_lossily() {
        let mut tail = StderrTail::default();
        tail.push(b"caf\xe9 au lait\n");
        assert_eq!(tail.text(), "caf\u{fffd} au lait");
    }
}
