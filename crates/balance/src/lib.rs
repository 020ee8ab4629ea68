//! Endpoint pickers, and the small lock-free pieces they feed on.
//!
//! A [`Picker`] is built off the hot path whenever a service's endpoint set changes, then read
//! by every request at once through `&self` (it is `Send + Sync`). The rule for everything a
//! request touches here: a pick takes no lock, allocates nothing, and costs O(1) or O(log n)
//! in the number of endpoints, expected; the cost of each policy, and where it approximates
//! to get there, is stated on [`Picker`]. Live endpoint state (health, in-flight count,
//! latency) is not owned here: the caller passes it at pick time through [`Candidate`], read
//! from atomics that survive rebuilds.
//!
//! - [`Picker`]: round robin, least connections, weighted random, P2C over peak EWMA, Maglev
//!   consistent hashing; slow start, exclusion of tried endpoints, panic mode.
//! - [`RoundRobin`]: nginx's smooth weighted round robin alone (the cycle `Picker` uses).
//! - [`PeakEwma`]: a lock-free peak-EWMA latency tracker, the input of P2C.
//! - [`StickTable`]: a bounded lock-free client → endpoint table with expiry.
//! - [`hash_bytes`]: the stable hash for affinity keys.

mod alias;
mod ewma;
mod hash;
mod maglev;
mod picker;
mod rng;
mod round_robin;
mod stick;

pub use ewma::{DEFAULT_DECAY, PeakEwma};
pub use hash::hash_bytes;
pub use picker::{Candidate, Pick, Picker};
pub use round_robin::RoundRobin;
pub use stick::StickTable;
