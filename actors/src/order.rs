//! The order in which eviction candidates are taken: a setting read by the
//! planner, the manager's config and the events that report it, so it sits
//! below all three.

/// The order in which eviction candidates are taken (policy step 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// Lowest tier first, then least recently used.
    #[default]
    Strict,
    /// Cheapest expected reload first: each candidate's reload cost (its
    /// bytes) weighed by the chance it is asked for again soon, predicted
    /// from the request history kept in the ledger.
    Adaptive,
}

impl Order {
    /// The name used in settings and outputs.
    pub fn as_str(self) -> &'static str {
        match self {
            Order::Strict => "strict",
            Order::Adaptive => "adaptive",
        }
    }
}
