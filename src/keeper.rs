//! The keeper: a small process between the manager and each model server
//! that owns the server's whole process tree, so no process started for a
//! model outlives the model or the manager.
//!
//! The manager starts `PROGRAM __vram-keeper MANAGER_PID STOP_MS -- COMMAND...`
//! (the same executable, see [`run_if_keeper`]). The keeper
//!
//! - asks the kernel for SIGTERM when the manager dies
//!   (`PR_SET_PDEATHSIG`; it is spawned from a thread that lives as long as
//!   the manager, because the signal follows the spawning *thread*), and
//!   exits at once if the manager is already gone;
//! - becomes a child subreaper (`PR_SET_CHILD_SUBREAPER`): a process of the
//!   tree whose parent exits (a double fork, a daemon that called `setsid`)
//!   is re-parented to the keeper instead of PID 1, so every process started
//!   for the model stays a descendant of the keeper, found through the
//!   parent links of `/proc`;
//! - starts the server, reports `pid N` on its standard output and then
//!   waits for signals:
//!   - the server (the tree's leader) exits: it reports `exit STATUS` and
//!     stops the rest of the tree;
//!   - SIGTERM, SIGINT or SIGHUP (an unload, the manager's shutdown, or the
//!     manager's death): it stops the tree;
//!   - SIGUSR1 (a load abandoned, a backend reset): it kills the tree at
//!     once.
//!
//! Stopping the tree: SIGTERM to every descendant, up to `STOP_MS` for all
//! of them to exit, then SIGKILL to whatever remains (reported as
//! `escalated N`) until none remains; every child is reaped. The keeper
//! exits only when its tree is empty, so the manager knows the model's
//! memory is free when the keeper's standard output closes.
//!
//! Limits: off Linux there is neither a subreaper nor a parent-death
//! signal; the keeper then stops its own process group (which a `setsid`
//! daemon leaves), and a SIGKILLed manager leaves its keepers running.

use std::ffi::OsString;
use std::io::{self, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::libc;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::unistd::Pid;

/// The first argument that turns an executable into a keeper.
pub const KEEPER_ARG: &str = "__vram-keeper";

/// How long the keeper waits, once its tree shows no live process, for the
/// server's exit to complete (its last threads torn down) so it can be
/// reaped.
const LEADER_REAP: Duration = Duration::from_secs(2);

/// Set once this executable has shown it can act as a keeper.
static HOSTS_KEEPER: AtomicBool = AtomicBool::new(false);

/// Runs the keeper and exits if this process was started as one;
/// otherwise returns at once, and from then on the process backend starts
/// its keepers from this same executable.
///
/// Call it first thing in `main` of any program that runs process-backed
/// models (the `vram-manager` binary does). A program that does not call it
/// needs a `vram-manager` executable beside it, in its parent directory, or
/// on `PATH` (or named by `VRAM_MANAGER_KEEPER`) to act as its keeper.
pub fn run_if_keeper() {
    let mut args = std::env::args_os();
    let _program = args.next();
    if args.next().as_deref() == Some(KEEPER_ARG.as_ref()) {
        let code = run(args.collect());
        std::process::exit(code);
    }
    HOSTS_KEEPER.store(true, Ordering::Relaxed);
}

/// The executable to start keepers from: this one if it called
/// [`run_if_keeper`], else `VRAM_MANAGER_KEEPER`, else a `vram-manager`
/// beside this executable, in its parent directory, or on `PATH`.
pub fn program() -> Result<std::path::PathBuf, String> {
    let current = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"));
    if HOSTS_KEEPER.load(Ordering::Relaxed) {
        // /proc/self/exe still starts this program after its file was
        // replaced on disk (an upgrade, a rebuild), where current_exe()
        // names a "(deleted)" path.
        #[cfg(target_os = "linux")]
        return Ok(std::path::PathBuf::from("/proc/self/exe"));
        #[cfg(not(target_os = "linux"))]
        return current;
    }
    if let Some(path) = std::env::var_os("VRAM_MANAGER_KEEPER") {
        return Ok(path.into());
    }
    let mut places = Vec::new();
    if let Ok(current) = &current {
        // Beside this program, or one level up: cargo puts tests and
        // examples in target/*/deps and target/*/examples.
        for dir in current.ancestors().skip(1).take(2) {
            places.push(dir.join("vram-manager"));
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        places.extend(std::env::split_paths(&path).map(|d| d.join("vram-manager")));
    }
    places.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        "no keeper program: call vram_manager::keeper::run_if_keeper() at the top of main, \
         or put vram-manager on PATH (or name it in VRAM_MANAGER_KEEPER)"
            .to_string()
    })
}

/// What the keeper reports on its standard output, one line each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// The server started with this process id.
    Started(i32),
    /// The server could not be started.
    Error(String),
    /// The server exited ("exit status: 1", "signal: 15 (SIGTERM)").
    Exit(String),
    /// This many processes outlived SIGTERM by the stop timeout and were
    /// killed.
    Escalated(usize),
    /// This many processes were killed at once (no SIGTERM first: a load
    /// abandoned, a backend reset).
    Killed(usize),
}

impl Report {
    /// Parses one line; `None` for anything else.
    pub fn parse(line: &str) -> Option<Self> {
        let (word, rest) = line.split_once(' ')?;
        match word {
            "pid" => rest.parse().ok().map(Self::Started),
            "error" => Some(Self::Error(rest.to_string())),
            "exit" => Some(Self::Exit(rest.to_string())),
            "escalated" => rest.parse().ok().map(Self::Escalated),
            "killed" => rest.parse().ok().map(Self::Killed),
            _ => None,
        }
    }

    fn line(&self) -> String {
        match self {
            Self::Started(pid) => format!("pid {pid}\n"),
            Self::Error(message) => format!("error {}\n", message.replace('\n', " ")),
            Self::Exit(status) => format!("exit {status}\n"),
            Self::Escalated(n) => format!("escalated {n}\n"),
            Self::Killed(n) => format!("killed {n}\n"),
        }
    }
}

fn report(report: &Report) {
    let mut out = std::io::stdout().lock();
    // The manager may be gone; the tree is stopped all the same.
    let _ = out.write_all(report.line().as_bytes());
    let _ = out.flush();
}

/// Runs the keeper with the arguments after [`KEEPER_ARG`]; answers its
/// exit status.
pub fn run(args: Vec<OsString>) -> i32 {
    let parsed = (|| {
        let mut args = args.into_iter();
        let manager: i32 = args.next()?.to_str()?.parse().ok()?;
        let stop_ms: u64 = args.next()?.to_str()?.parse().ok()?;
        if args.next()? != "--" {
            return None;
        }
        let program = args.next()?;
        Some((
            manager,
            Duration::from_millis(stop_ms),
            program,
            args.collect::<Vec<_>>(),
        ))
    })();
    let Some((manager, stop_timeout, program, rest)) = parsed else {
        eprintln!("usage: {KEEPER_ARG} MANAGER_PID STOP_MS -- PROGRAM [ARGS...]");
        return 2;
    };
    if let Err(e) = guard(manager) {
        report(&Report::Error(e));
        return 1;
    }
    // SIGCHLD ignored by inheritance would reap children unseen.
    // SAFETY: restoring a default disposition installs no handler code.
    let _ =
        unsafe { nix::sys::signal::signal(Signal::SIGCHLD, nix::sys::signal::SigHandler::SigDfl) };
    // Signals are taken synchronously with sigtimedwait, never by handler;
    // the server starts with an empty mask (reset before its exec).
    let signals = keeper_signals();
    if let Err(e) = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&signals), None) {
        report(&Report::Error(format!("cannot block signals: {e}")));
        return 1;
    }
    let mut command = Command::new(&program);
    command
        .args(&rest)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    #[cfg(not(target_os = "linux"))]
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    // SAFETY: between fork and exec only async-signal-safe calls are
    // allowed; sigprocmask and prctl are one system call each. The server
    // must not inherit the keeper's blocked signals (it would ignore
    // SIGTERM), and dies with the keeper should the keeper itself be
    // killed (the keeper is single-threaded: its one thread is the parent).
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
                .map_err(io::Error::from)?;
            #[cfg(target_os = "linux")]
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)?;
            Ok(())
        });
    }
    let leader = match command.spawn() {
        Ok(child) => Pid::from_raw(child.id() as i32),
        Err(e) => {
            report(&Report::Error(format!(
                "cannot start {:?}: {e}",
                program.to_string_lossy()
            )));
            return 1;
        }
    };
    report(&Report::Started(leader.as_raw()));
    let mut tree = Tree {
        leader,
        leader_status: None,
        signals,
    };
    loop {
        match tree.wait_signal(None) {
            Some(Signal::SIGCHLD) => {
                tree.reap();
                if tree.leader_status.is_some() {
                    tree.stop(stop_timeout);
                    return 0;
                }
            }
            Some(Signal::SIGUSR1) => {
                tree.stop(Duration::ZERO);
                return 0;
            }
            Some(_) => {
                tree.stop(stop_timeout);
                return 0;
            }
            None => {}
        }
    }
}

/// Arms the parent-death signal and checks the manager is still there.
fn guard(manager: i32) -> Result<(), String> {
    #[cfg(target_os = "linux")]
    {
        nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)
            .map_err(|e| format!("PR_SET_PDEATHSIG: {e}"))?;
        nix::sys::prctl::set_child_subreaper(true)
            .map_err(|e| format!("PR_SET_CHILD_SUBREAPER: {e}"))?;
    }
    // The manager may have died before the signal was armed.
    if nix::unistd::getppid().as_raw() != manager {
        return Err("the manager exited before its model server started".to_string());
    }
    Ok(())
}

fn keeper_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGUSR1,
    ] {
        set.add(s);
    }
    set
}

/// The keeper's view of its tree.
struct Tree {
    leader: Pid,
    leader_status: Option<String>,
    signals: SigSet,
}

impl Tree {
    /// Waits for one of the keeper's signals, at most `limit` (forever
    /// when `None`).
    fn wait_signal(&self, limit: Option<Duration>) -> Option<Signal> {
        let timeout = limit.map(|d| libc::timespec {
            tv_sec: d.as_secs() as libc::time_t,
            tv_nsec: d.subsec_nanos() as libc::c_long,
        });
        let pointer = timeout
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: the set and the timespec outlive the call; a null info
        // pointer is allowed.
        let signal =
            unsafe { libc::sigtimedwait(self.signals.as_ref(), std::ptr::null_mut(), pointer) };
        Signal::try_from(signal).ok()
    }

    /// Reaps every exited child; records the leader's status.
    fn reap(&mut self) {
        loop {
            let mut status = 0;
            // SAFETY: waitpid writes the status through a valid pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return;
            }
            if pid == self.leader.as_raw() {
                use std::os::unix::process::ExitStatusExt;
                let text = std::process::ExitStatus::from_raw(status).to_string();
                report(&Report::Exit(text.clone()));
                self.leader_status = Some(text);
            }
        }
    }

    /// SIGTERM to the whole tree, up to `limit` for it to exit, then
    /// SIGKILL until nothing remains.
    fn stop(&mut self, limit: Duration) {
        let alive = self.alive();
        if !alive.is_empty() && !limit.is_zero() {
            for pid in &alive {
                let _ = kill(*pid, Signal::SIGTERM);
            }
            let deadline = Instant::now() + limit;
            loop {
                self.reap();
                if self.alive().is_empty() {
                    // Zombies are not alive but still to be reaped.
                    self.reap_leader(Instant::now() + LEADER_REAP);
                    return;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                // Wake on a child's exit, and at least every 50 ms for
                // grandchildren whose exit is no signal to the keeper.
                if let Some(signal) = self.wait_signal(Some(left.min(Duration::from_millis(50))))
                    && signal == Signal::SIGUSR1
                {
                    break;
                }
            }
        }
        let mut escalated = 0;
        loop {
            self.reap();
            let alive = self.alive();
            if alive.is_empty() {
                break;
            }
            escalated = escalated.max(alive.len());
            for pid in &alive {
                let _ = kill(*pid, Signal::SIGKILL);
            }
            self.wait_signal(Some(Duration::from_millis(10)));
        }
        if escalated > 0 && limit.is_zero() {
            report(&Report::Killed(escalated));
        } else if escalated > 0 {
            report(&Report::Escalated(escalated));
        }
        self.reap_leader(Instant::now() + LEADER_REAP);
    }

    /// Reaps what has exited, waiting until `deadline` for the leader: a
    /// process whose main thread has exited shows as a zombie while its
    /// other threads are still being torn down, and cannot be reaped (nor
    /// has it let go of its memory) until they are. Returning before would
    /// lose its exit status and report the tree gone too soon.
    fn reap_leader(&mut self, deadline: Instant) {
        loop {
            self.reap();
            if self.leader_status.is_some() {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            // Its exit, once complete, is a SIGCHLD; a short bound in case
            // that signal was taken by an earlier wait.
            self.wait_signal(Some(left.min(Duration::from_millis(10))));
        }
    }

    /// The live processes of the tree: the descendants, and the leader
    /// itself while it is not reaped (even if `/proc` cannot be read).
    fn alive(&self) -> Vec<Pid> {
        let mut alive = descendants(self.leader);
        if self.leader_status.is_none() && !alive.contains(&self.leader) && is_running(self.leader)
        {
            alive.push(self.leader);
        }
        alive
    }
}

/// Whether process `pid` is running (a zombie, which has exited but is not
/// reaped yet, is not).
pub fn is_running(pid: Pid) -> bool {
    #[cfg(target_os = "linux")]
    {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
        })
    }
    #[cfg(not(target_os = "linux"))]
    {
        kill(pid, None).is_ok()
    }
}

/// The keeper's live descendants (zombies are not alive: they hold no
/// memory and are reaped as their parents exit).
#[cfg(target_os = "linux")]
fn descendants(_leader: Pid) -> Vec<Pid> {
    let table = process_table();
    let mut children: std::collections::HashMap<i32, Vec<&ProcessRow>> = Default::default();
    for row in &table {
        children.entry(row.ppid).or_default().push(row);
    }
    let mut alive = Vec::new();
    let mut parents = vec![std::process::id() as i32];
    while let Some(parent) = parents.pop() {
        for row in children.get(&parent).into_iter().flatten() {
            parents.push(row.pid);
            if !row.zombie {
                alive.push(Pid::from_raw(row.pid));
            }
        }
    }
    alive
}

/// Off Linux: the leader's process group (the leader leads its own).
#[cfg(not(target_os = "linux"))]
fn descendants(leader: Pid) -> Vec<Pid> {
    // Without /proc the group is the best the keeper can name; signal 0
    // tells whether any member is left. kill(-pgid) signals the group.
    if nix::sys::signal::killpg(leader, None).is_ok() {
        vec![Pid::from_raw(-leader.as_raw())]
    } else {
        vec![]
    }
}

/// One row of the process table.
#[cfg(target_os = "linux")]
#[derive(Debug, Clone, Copy)]
struct ProcessRow {
    pid: i32,
    ppid: i32,
    zombie: bool,
}

/// Every process's id, parent and whether it is a zombie, from `/proc`.
#[cfg(target_os = "linux")]
fn process_table() -> Vec<ProcessRow> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.filter_map(|entry| {
        let pid: i32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // "PID (COMM) STATE PPID ...": COMM may hold spaces and parens.
        let (_, rest) = stat.rsplit_once(") ")?;
        let mut fields = rest.split_whitespace();
        let state = fields.next()?;
        let ppid = fields.next()?.parse().ok()?;
        Some(ProcessRow {
            pid,
            ppid,
            zombie: state == "Z" || state == "X",
        })
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip_through_their_lines() {
        for r in [
            Report::Started(42),
            Report::Error("cannot start \"x\": not found".into()),
            Report::Exit("signal: 15 (SIGTERM)".into()),
            Report::Escalated(3),
            Report::Killed(2),
        ] {
            let line = r.line();
            assert_eq!(Report::parse(line.trim_end()), Some(r));
        }
        assert_eq!(Report::parse("hello"), None);
        assert_eq!(Report::parse("pid x"), None);
    }

    #[test]
    fn bad_keeper_arguments_are_refused() {
        assert_eq!(run(vec!["1".into()]), 2);
        assert_eq!(run(vec!["1".into(), "10".into(), "x".into()]), 2);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_process_table_knows_this_process_and_its_parent() {
        let me = std::process::id() as i32;
        let row = process_table()
            .into_iter()
            .find(|p| p.pid == me)
            .expect("this process is listed");
        assert_eq!(row.ppid, nix::unistd::getppid().as_raw());
        assert!(!row.zombie);
    }
}
