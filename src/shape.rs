//! The shape of a settings or scenario file, checked strictly before the
//! layers are merged: every key known, every value of its own type (a
//! boolean is `true` or `false`, an integer is an integer, an id is a
//! string), each error naming the key path and the line.
//!
//! The layering (`config` crate) converts loosely between types, which suits
//! environment variables (always strings) but would let `pinned = "on"` or
//! `priority = 1.9` through from a file; so a file is read here first, as
//! written. Values are checked later, where they are built
//! (`config::RawSettings::validate`, `scenario::RawStep::validate`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Why a file (or the environment) does not have the right shape; the
/// settings turn it into their own error (`SettingsError`).
#[derive(Debug)]
pub(crate) enum ShapeError {
    /// Not TOML at all: which file, and the parser's message with line and
    /// column.
    Toml { origin: String, message: String },
    /// TOML of the wrong shape: the message names key path and line.
    Shape(String),
}

/// A settings file: every section optional (the defaults fill the rest).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SettingsShape {
    #[serde(skip_serializing_if = "Option::is_none")]
    gpu: Option<Gpu>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gpus: Option<Vec<Card>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    host: Option<Host>,
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<Policy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    server: Option<Server>,
    #[serde(skip_serializing_if = "Option::is_none")]
    process: Option<Process>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kinds: Option<BTreeMap<String, Kind>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    models: Option<Vec<Model>>,
}

/// A scenario file: the settings, a description and steps.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ScenarioShape<S> {
    #[serde(default)]
    pub(crate) description: String,
    #[serde(default = "none")]
    pub(crate) steps: Option<Vec<S>>,
    #[serde(default)]
    gpu: Option<Gpu>,
    #[serde(default)]
    gpus: Option<Vec<Card>>,
    #[serde(default)]
    host: Option<Host>,
    #[serde(default)]
    policy: Option<Policy>,
    #[serde(default)]
    server: Option<Server>,
    #[serde(default)]
    process: Option<Process>,
    #[serde(default)]
    kinds: Option<BTreeMap<String, Kind>>,
    #[serde(default)]
    models: Option<Vec<Model>>,
}

/// No value (a default that asks nothing of the type).
fn none<T>() -> Option<T> {
    None
}

impl<S> ScenarioShape<S> {
    /// The settings part, as TOML text for the layers.
    pub(crate) fn settings_text(&mut self) -> Result<String, ShapeError> {
        let settings = SettingsShape {
            gpu: self.gpu.take(),
            gpus: self.gpus.take(),
            host: self.host.take(),
            policy: self.policy.take(),
            server: self.server.take(),
            process: self.process.take(),
            kinds: self.kinds.take(),
            models: self.models.take(),
        };
        toml::to_string(&settings).map_err(|e| ShapeError::Shape(e.to_string()))
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Gpu {
    #[serde(skip_serializing_if = "Option::is_none")]
    probe: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    total: Option<Size>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reserve: Option<Size>,
    #[serde(skip_serializing_if = "Option::is_none")]
    release_fraction: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    release_poll: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    release_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    external: Option<Size>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Host {
    #[serde(skip_serializing_if = "Option::is_none")]
    budget: Option<Size>,
    #[serde(skip_serializing_if = "Option::is_none")]
    keep_warm: Option<Size>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Park {
    #[serde(skip_serializing_if = "Option::is_none")]
    sleep: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    wake: Option<String>,
    vram: Size,
    host: Size,
    #[serde(skip_serializing_if = "Option::is_none")]
    sleep_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    wake_ms: Option<u64>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Card {
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<String>,
    total: Size,
    #[serde(skip_serializing_if = "Option::is_none")]
    reserve: Option<Size>,
    #[serde(skip_serializing_if = "Option::is_none")]
    external: Option<Size>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Policy {
    #[serde(skip_serializing_if = "Option::is_none")]
    order: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lease_wait: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    load_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unload_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_queue: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    restart_backoff: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    restart_backoff_max: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Server {
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_body: Option<Size>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shutdown_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_lease_ttl: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Process {
    #[serde(skip_serializing_if = "Option::is_none")]
    ready_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_timeout: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Kind {
    #[serde(skip_serializing_if = "Option::is_none")]
    priority: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    protected: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Model {
    id: String,
    kind: String,
    vram: Size,
    #[serde(skip_serializing_if = "Option::is_none")]
    pinned: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backend: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    load_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    warm_load_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unload_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fail_load: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    actual_vram: Option<Size>,
    #[serde(skip_serializing_if = "Option::is_none")]
    release_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    command: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    env: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cwd: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ready: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ready_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    proxy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    files: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gpus: Option<Vec<u64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    park: Option<Park>,
}

/// A size as written: a string such as "3GiB" (checked when it is built);
/// a bare number is refused here, naming the missing unit.
#[derive(Debug, Serialize)]
#[serde(transparent)]
struct Size(String);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Size;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a size such as \"3GiB\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Size, E> {
                Ok(Size(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Size, E> {
                Err(E::custom(format!(
                    "size {v} has no unit; write e.g. \"{v}GiB\" or \"512MiB\""
                )))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Size, E> {
                Err(E::custom(format!(
                    "size {v} has no unit; write e.g. \"{v}GiB\" or \"512MiB\""
                )))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Size, E> {
                Err(E::custom(format!(
                    "size {v} has no unit; write e.g. \"{v}GiB\""
                )))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// Reads `text` (from `origin`) as a `T`, strictly; an error names the key
/// path and the line: `origin: steps[3].ms (line 40): invalid type: ...`.
pub(crate) fn read<T: serde::de::DeserializeOwned>(
    origin: &str,
    text: &str,
) -> Result<T, ShapeError> {
    let deserializer = toml::Deserializer::parse(text).map_err(|e| ShapeError::Toml {
        origin: origin.to_string(),
        message: e.to_string().trim_end().to_string(),
    })?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let line = inner
            .span()
            .map(|span| format!(" (line {})", line_of(text, span.start)))
            .unwrap_or_default();
        let message = inner
            .message()
            .replace("expected u32", "expected a whole number from 0 to 65535")
            .replace("expected u64", "expected a whole number from 0");
        if path == "." || path.is_empty() {
            ShapeError::Shape(format!("{origin}{line}: {message}"))
        } else {
            ShapeError::Shape(format!("{origin}: {path}{line}: {message}"))
        }
    })
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// Checks the `VRAM__SECTION__KEY` variables by the same shape as a file:
/// a value reads as TOML (`64`, `true`, `0.75`) where it can, as text
/// otherwise, and as text too where the key wants text (`VRAM__GPU__DEVICE=0`
/// is the device "0"). So `VRAM__KINDS__LLM__PRIORITY=1.9` or
/// `VRAM__KINDS__LLM__PROTECTED=on` is refused, naming the variable, where
/// the layering alone would round or guess.
pub(crate) fn check_environment(variables: &[(String, String)]) -> Result<(), ShapeError> {
    let ours: Vec<(Vec<String>, &str, &str)> = variables
        .iter()
        .filter_map(|(name, value)| {
            let path = name.strip_prefix("VRAM__")?;
            let keys: Vec<String> = path.split("__").map(str::to_lowercase).collect();
            (!keys.iter().any(String::is_empty)).then_some((keys, name.as_str(), value.as_str()))
        })
        .collect();
    if ours.is_empty() {
        return Ok(());
    }
    let mut as_text = vec![false; ours.len()];
    loop {
        let mut table = toml::Table::new();
        for ((keys, _, value), text) in ours.iter().zip(&as_text) {
            let typed = if *text {
                None
            } else {
                toml::from_str::<toml::Table>(&format!("v = {value}"))
                    .ok()
                    .and_then(|mut t| t.remove("v"))
            };
            insert(
                &mut table,
                keys,
                typed.unwrap_or_else(|| toml::Value::String((*value).to_string())),
            );
        }
        let text = toml::to_string(&table).map_err(|e| ShapeError::Shape(e.to_string()))?;
        let deserializer = toml::Deserializer::parse(&text)
            .map_err(|e| ShapeError::Shape(format!("VRAM__* variables: {}", e.message())))?;
        let Err(e) = serde_path_to_error::deserialize::<_, SettingsShape>(deserializer) else {
            return Ok(());
        };
        let path = e.path().to_string();
        let found = ours.iter().position(|(keys, _, _)| keys.join(".") == path);
        match found {
            // Wanted as text, perhaps: try the variable as text once.
            Some(i) if !as_text[i] => as_text[i] = true,
            _ => {
                let name = found.map_or_else(
                    || format!("VRAM__{}", path.to_uppercase().replace('.', "__")),
                    |i| ours[i].1.to_string(),
                );
                let message = e
                    .into_inner()
                    .message()
                    .replace("expected u32", "expected a whole number from 0 to 65535")
                    .replace("expected u64", "expected a whole number from 0");
                return Err(ShapeError::Shape(format!(
                    "environment variable {name} ({path}): {message}"
                )));
            }
        }
    }
}

/// Puts `value` at `keys` in `table`, making the tables on the way.
fn insert(table: &mut toml::Table, keys: &[String], value: toml::Value) {
    match keys {
        [] => {}
        [last] => {
            table.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            let entry = table
                .entry(first.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let toml::Value::Table(inner) = entry {
                insert(inner, rest, value);
            }
        }
    }
}
