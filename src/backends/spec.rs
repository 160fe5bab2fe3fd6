//! What a process-backed model is: its command, how to tell it is ready,
//! how to stop it. Read by the process backend and the server keeper alike,
//! so it lives apart from both.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use awc::http::Uri;

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
    /// The URL a POST to which puts the server to sleep (parks it), if it
    /// can park.
    pub sleep: Option<String>,
    /// The URL a POST to which wakes it.
    pub wake: Option<String>,
}

impl ProcessSpec {
    /// The spec as started on the card `device`: `{gpu}` in its command,
    /// stop command, environment values and cwd becomes the device, and
    /// `CUDA_VISIBLE_DEVICES` names it unless the model sets it itself.
    pub fn on_device(&self, device: &str) -> ProcessSpec {
        let card = |text: &String| text.replace("{gpu}", device);
        let mut env: BTreeMap<String, String> =
            self.env.iter().map(|(k, v)| (k.clone(), card(v))).collect();
        env.entry("CUDA_VISIBLE_DEVICES".to_string())
            .or_insert_with(|| device.to_string());
        ProcessSpec {
            command: self.command.iter().map(card).collect(),
            stop: self.stop.iter().map(card).collect(),
            env,
            cwd: self
                .cwd
                .as_ref()
                .map(|c| card(&c.to_string_lossy().into_owned()).into()),
            ready: self.ready.clone(),
            ready_timeout: self.ready_timeout,
            stop_timeout: self.stop_timeout,
            sleep: self.sleep.as_ref().map(card),
            wake: self.wake.as_ref().map(card),
        }
    }
}
