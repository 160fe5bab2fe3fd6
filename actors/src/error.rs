//! `VramError`: every failure a caller of the manager can act on, each with
//! a stable code string (shown by the CLI and in JSON) and the numbers that
//! explain it.

/// Why a request to the manager failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VramError {
    /// The model id is not in the catalog.
    #[error("unknown model {model:?}")]
    UnknownModel {
        /// The id that was asked for.
        model: String,
    },
    /// The model is larger than the whole usable card; no eviction helps.
    #[error("{model} needs {needed} bytes but the card's capacity is {capacity} bytes")]
    ExceedsCapacity {
        /// The model asked for.
        model: String,
        /// Its size in bytes.
        needed: u64,
        /// The usable capacity in bytes.
        capacity: u64,
    },
    /// Evicting everything this request may evict would still not make room.
    /// Nothing was evicted.
    #[error(
        "not enough VRAM for {model}: needs {needed} bytes, {free} free, {evictable} evictable ({leased} more held by leases)"
    )]
    InsufficientVram {
        /// The model asked for.
        model: String,
        /// Its size in bytes.
        needed: u64,
        /// Free bytes when the request was planned.
        free: u64,
        /// Bytes the request was allowed to evict.
        evictable: u64,
        /// Bytes of otherwise evictable models that were leased.
        leased: u64,
    },
    /// The model is leased by a request that is still using it.
    #[error("{model} is in use by {leases} lease(s)")]
    InUse {
        /// The model asked for.
        model: String,
        /// How many leases still hold it.
        leases: u32,
    },
    /// The backend refused, failed or panicked.
    #[error("backend for {model} failed: {reason}")]
    BackendFailed {
        /// The model being loaded or unloaded.
        model: String,
        /// What the backend said.
        reason: String,
    },
    /// The backend did not answer within its timeout.
    #[error(
        "backend for {model} did not answer within {after_ms} ms{}",
        colon_then(reason)
    )]
    Timeout {
        /// The model being loaded or unloaded.
        model: String,
        /// The timeout that ran out, in milliseconds.
        after_ms: u64,
        /// What the backend said when it gave up waiting (e.g. which
        /// readiness check never passed); empty when the manager's own
        /// timeout cut the call off.
        reason: String,
    },
    /// The manager's queue is full; try again later.
    #[error("queue full ({queued} operations waiting)")]
    Busy {
        /// How many operations were waiting.
        queued: usize,
    },
    /// The manager is gone or shutting down: it takes no more work. Not a
    /// fault of any backend.
    #[error("the manager is unavailable: {reason}")]
    Unavailable {
        /// Why, e.g. "the manager is shutting down".
        reason: String,
    },
}

/// `": reason"`, or nothing for an empty reason.
fn colon_then(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(": {reason}")
    }
}

impl VramError {
    /// The stable, lower snake case code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnknownModel { .. } => "unknown_model",
            Self::ExceedsCapacity { .. } => "exceeds_capacity",
            Self::InsufficientVram { .. } => "insufficient_vram",
            Self::InUse { .. } => "in_use",
            Self::BackendFailed { .. } => "backend_failed",
            Self::Timeout { .. } => "timeout",
            Self::Busy { .. } => "busy",
            Self::Unavailable { .. } => "unavailable",
        }
    }

    /// Every code the manager can answer, in the order the README lists them.
    pub const CODES: [&'static str; 8] = [
        "unknown_model",
        "exceeds_capacity",
        "insufficient_vram",
        "in_use",
        "backend_failed",
        "timeout",
        "busy",
        "unavailable",
    ];

    /// What a manager that is shutting down answers.
    pub(crate) fn shutting_down() -> Self {
        Self::Unavailable {
            reason: "the manager is shutting down".to_string(),
        }
    }
}

/// What a caught panic said (its message, when it was a string).
pub(crate) fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable_strings() {
        let errors = [
            VramError::UnknownModel { model: "m".into() },
            VramError::ExceedsCapacity {
                model: "m".into(),
                needed: 2,
                capacity: 1,
            },
            VramError::InsufficientVram {
                model: "m".into(),
                needed: 2,
                free: 0,
                evictable: 1,
                leased: 0,
            },
            VramError::InUse {
                model: "m".into(),
                leases: 1,
            },
            VramError::BackendFailed {
                model: "m".into(),
                reason: "x".into(),
            },
            VramError::Timeout {
                model: "m".into(),
                after_ms: 5,
                reason: String::new(),
            },
            VramError::Busy { queued: 64 },
            VramError::Unavailable {
                reason: "stopped".into(),
            },
        ];
        let codes: Vec<_> = errors.iter().map(VramError::code).collect();
        assert_eq!(codes, VramError::CODES);
    }

    #[test]
    fn messages_carry_the_numbers() {
        let e = VramError::InsufficientVram {
            model: "llm2".into(),
            needed: 7,
            free: 2,
            evictable: 4,
            leased: 0,
        };
        let text = e.to_string();
        assert!(text.contains("llm2") && text.contains("7") && text.contains("4 evictable"));
    }

    #[test]
    fn a_timeout_names_its_reason_when_it_has_one() {
        let mut e = VramError::Timeout {
            model: "whisper".into(),
            after_ms: 3000,
            reason: "GET /health never answered 200".into(),
        };
        assert_eq!(
            e.to_string(),
            "backend for whisper did not answer within 3000 ms: GET /health never answered 200"
        );
        if let VramError::Timeout { reason, .. } = &mut e {
            reason.clear();
        }
        assert_eq!(
            e.to_string(),
            "backend for whisper did not answer within 3000 ms",
            "no dangling colon without a reason"
        );
    }

    #[test]
    fn unavailable_is_its_own_code_and_says_why() {
        let e = VramError::Unavailable {
            reason: "the manager is shutting down".into(),
        };
        assert_eq!(e.code(), "unavailable");
        assert!(e.to_string().contains("shutting down"), "{e}");
    }
}
