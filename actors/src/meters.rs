//! The manager's metrics, through the `metrics` facade, with the handles
//! of each model kept once registered.
//!
//! Registering a labelled metric builds its key (labels copied, hashed)
//! and asks the recorder for it: on every load that would be a few
//! allocations and lookups, with or without a recorder. The handles are
//! registered at a model's first load and reused, so a recorder must be
//! installed before the first load (as `vram-manager serve` does) for
//! its metrics to be recorded.

use metrics::{Counter, Gauge, Histogram};

/// The handles of one model, each registered at its first use.
#[derive(Default)]
struct ModelMeters {
    /// `vram_manager_loads_total{model, result}`, by result code.
    loads: Vec<(&'static str, Counter)>,
    /// `vram_manager_load_duration_seconds{model}`.
    duration: Option<Histogram>,
    /// `vram_manager_evictions_total{model, kind}`.
    evictions: Option<Counter>,
}

/// The manager's metric handles, each registered at its first use (so a
/// recorder installed after the manager started, before its first load,
/// records everything).
#[derive(Default)]
pub(crate) struct Meters {
    models: foldhash::HashMap<String, ModelMeters>,
    queue_length: Option<Gauge>,
    release_wait: Option<Histogram>,
}

impl Meters {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Runs `f` on `model`'s handles, made (unregistered) at its first
    /// use: one lookup once they exist.
    fn with_model(&mut self, model: &str, f: impl FnOnce(&mut ModelMeters)) {
        match self.models.get_mut(model) {
            Some(meters) => f(meters),
            None => f(self.models.entry(model.to_string()).or_default()),
        }
    }

    /// A load of `model` ended with `result` ("ok" or an error code) after
    /// `seconds`.
    pub(crate) fn load(&mut self, model: &str, result: &'static str, seconds: f64) {
        self.with_model(model, |meters| {
            meters
                .duration
                .get_or_insert_with(|| {
                    metrics::histogram!("vram_manager_load_duration_seconds", "model" => model.to_string())
                })
                .record(seconds);
            match meters.loads.iter().find(|(r, _)| *r == result) {
                Some((_, counter)) => counter.increment(1),
                None => {
                    let counter = metrics::counter!("vram_manager_loads_total", "model" => model.to_string(), "result" => result);
                    counter.increment(1);
                    meters.loads.push((result, counter));
                }
            }
        });
    }

    /// `model` (of `kind`) was evicted.
    pub(crate) fn evicted(&mut self, model: &str, kind: &str) {
        self.with_model(model, |meters| {
            meters
                .evictions
                .get_or_insert_with(|| {
                    metrics::counter!("vram_manager_evictions_total", "model" => model.to_string(), "kind" => kind.to_string())
                })
                .increment(1);
        });
    }

    /// The queue now holds `length` jobs.
    pub(crate) fn queue_length(&mut self, length: usize) {
        self.queue_length
            .get_or_insert_with(|| metrics::gauge!("vram_manager_queue_length"))
            .set(length as f64);
    }

    /// A load waited `seconds` for evicted memory to come back.
    pub(crate) fn release_wait(&mut self, seconds: f64) {
        self.release_wait
            .get_or_insert_with(|| metrics::histogram!("vram_manager_release_wait_seconds"))
            .record(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    #[test]
    fn kept_handles_record_every_use() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        // Made before the recorder is there (as `serve` starts the manager
        // before its exporter): nothing is registered until first use.
        let mut meters = Meters::new();
        metrics::with_local_recorder(&recorder, || {
            meters.load("a", "ok", 0.5);
            meters.load("a", "ok", 0.25);
            meters.load("a", "backend_failed", 0.1);
            meters.evicted("a", "llm");
            meters.evicted("a", "llm");
            meters.evicted("b", "tts");
            meters.queue_length(3);
            meters.release_wait(0.2);
        });
        let mut counters = std::collections::BTreeMap::new();
        let mut durations = 0;
        let mut names = std::collections::BTreeSet::new();
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            let (key, labels) = key.key().clone().into_parts();
            names.insert(format!(
                "{}{}",
                key.as_str(),
                labels
                    .iter()
                    .map(|l| format!(" {}={}", l.key(), l.value()))
                    .collect::<String>()
            ));
            let labels: Vec<String> = labels
                .iter()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            match value {
                DebugValue::Counter(n) => {
                    counters.insert(format!("{} {}", key.as_str(), labels.join(",")), n);
                }
                DebugValue::Histogram(values) if key.as_str().ends_with("duration_seconds") => {
                    durations += values.len();
                }
                _ => {}
            }
        }
        assert_eq!(
            counters.get("vram_manager_loads_total model=a,result=ok"),
            Some(&2)
        );
        assert_eq!(
            counters.get("vram_manager_loads_total model=a,result=backend_failed"),
            Some(&1)
        );
        assert_eq!(
            counters.get("vram_manager_evictions_total model=a,kind=llm"),
            Some(&2)
        );
        assert_eq!(durations, 3);
        assert!(names.contains("vram_manager_queue_length"), "{names:?}");
        assert!(
            names.contains("vram_manager_release_wait_seconds"),
            "{names:?}"
        );
        // A model only ever evicted has no (empty) load-duration series.
        assert!(
            !names.contains("vram_manager_load_duration_seconds model=b"),
            "{names:?}"
        );
    }
}
