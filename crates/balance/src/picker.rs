//! The per-service picker: one policy, built for one endpoint set, read by every request.
//!
//! A `Picker` holds only what the weights determine (a round-robin cycle, an alias table or
//! a Maglev table); what changes between requests (availability, load, latency, slow-start
//! ramp) is read at pick time through [`Candidate`]. Invariants, for every policy:
//! - an endpoint of weight 0, an excluded endpoint, or an index past the end of the
//!   candidate slice is never returned;
//! - an available endpoint is returned whenever one is eligible (fast path first, then an
//!   O(n) scan that only runs when the fast path's bounded attempts all missed);
//! - only when none is available is an unavailable one returned, flagged `panic`;
//! - a pick takes no lock, allocates nothing and loops a bounded number of times.

use std::fmt;
use std::sync::Arc;

use drover_model::Policy;

use crate::alias::AliasTable;
use crate::maglev::Maglev;
use crate::rng;
use crate::round_robin::RoundRobin;

/// What a picker needs to know about an endpoint at pick time.
pub trait Candidate {
    /// May take requests now: healthy and not ejected. (Drained endpoints never reach a
    /// picker as candidates: they have weight 0.)
    fn is_available(&self) -> bool;
    /// Requests in flight to it now.
    fn in_flight(&self) -> u64;
    /// Peak-EWMA latency in nanoseconds; 0 while nothing has been measured.
    fn latency_ewma_ns(&self) -> u64;
    /// Share of its weight it may use now, in 0.0..=1.0; below 1 during slow start.
    fn ramp(&self) -> f64;
}

macro_rules! forward_candidate {
    ($($wrapper:ty),*) => {$(
        impl<C: Candidate + ?Sized> Candidate for $wrapper {
            #[inline]
            fn is_available(&self) -> bool {
                (**self).is_available()
            }
            #[inline]
            fn in_flight(&self) -> u64 {
                (**self).in_flight()
            }
            #[inline]
            fn latency_ewma_ns(&self) -> u64 {
                (**self).latency_ewma_ns()
            }
            #[inline]
            fn ramp(&self) -> f64 {
                (**self).ramp()
            }
        }
    )*};
}

// So that a slice of `Arc<EndpointState>` (or of references) can be passed as it is.
forward_candidate!(&C, Box<C>, Arc<C>);

/// The outcome of a pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    /// Index into the endpoint list the picker was built for.
    pub index: usize,
    /// true when no endpoint was available, so an unavailable one was returned (panic mode)
    pub panic: bool,
}

/// Random draws (or round-robin probes, or hash probes) a pick makes before it gives up on
/// its fast path and scans.
const DRAWS: u32 = 16;
/// Draws spent looking for P2C's second candidate once the first is found.
const SECOND_DRAWS: u32 = 4;
/// Ramp rejections after which a pick takes the best-ramped endpoint it turned down. High
/// enough that the shortcut rarely distorts shares (8 rejections in a row by an endpoint at
/// ramp 0.25 with a quarter of the weight: 1 pick in 600,000), low enough to stay cheap when
/// every endpoint is ramping.
const RAMP_REJECTIONS: usize = 8;
/// Least-conn scans every endpoint up to this pool size, and samples above it.
const EXACT_LEAST_CONN: usize = 16;
/// Candidates a sampled least-conn pick compares.
const LEAST_CONN_CHOICES: u32 = 3;
/// Maglev slots a consistent-hash pick probes before falling back to rendezvous hashing.
const HASH_PROBES: u32 = 24;
/// The smallest ramp the O(n) fallbacks weigh with: an endpoint at ramp 0 is only taken
/// when nothing else is eligible.
const MIN_RAMP: f64 = 1e-9;

/// Whether a pass over the endpoints wants available ones, or (panic mode) any.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Available,
    Panic,
}

enum Strategy {
    RoundRobin(RoundRobin),
    /// The endpoints of non-zero weight, for sampling.
    LeastConn(Box<[u32]>),
    Random(AliasTable),
    P2cEwma(AliasTable),
    ConsistentHash(Maglev),
}

/// Picks an endpoint for each request of one service, by its policy.
///
/// Built with [`Picker::new`] (or [`Picker::with_identities`]) when the service's endpoint
/// set or weights change; then shared (`&self`, `Send + Sync`) by every thread. Costs are per
/// pick, n being the number of endpoints and e the length of `exclude` (tried endpoints of a
/// retry, so a handful):
///
/// | policy | fast path | memory |
/// | --- | --- | --- |
/// | `RoundRobin` | O(e), one atomic increment | Σw/gcd × 4 B |
/// | `LeastConn` | O(n) for n ≤ 16; O(e) above (sampled, approximate) | 4 B × n |
/// | `Random` | O(e) | 8 B × n |
/// | `P2cEwma` | O(e) | 8 B × n |
/// | `ConsistentHash` | O(e), one table read (+ probes) | 4 B × M (see below) |
///
/// - **RoundRobin**: nginx's smooth weighted cycle, one atomic ticket per pick. A turn whose
///   endpoint is unavailable or excluded goes to a random position of the cycle (a weighted
///   random endpoint) rather than to the next one: the next one would take every turn of its
///   predecessor and get twice its share. With every endpoint available the shares are exact
///   over each cycle.
/// - **LeastConn**: fewest `(in_flight + 1) / weight` among available endpoints. Exact for
///   pools of up to 16 endpoints (a scan from a random start, so ties spread). Above that it
///   is approximate, O(1): the best of 3 endpoints drawn uniformly from those of non-zero
///   weight. Not drawn by weight: the score already divides by weight, and weighting the
///   draw too counts it twice (in a closed-loop test of weights 1:2:3 over 30 endpoints,
///   weighted draws gave shares of 15.2/33.6/51.3%, uniform ones 17.0/33.6/49.3%, for
///   16.7/33.3/50%). No lock-free structure keeps an exact minimum over counters that every
///   request changes; sampling also keeps many threads from piling on the one endpoint
///   that looks least loaded.
/// - **Random**: a weighted random endpoint from an alias table (Vose), O(1).
/// - **P2cEwma**: two distinct weighted random candidates, the one with the lower
///   `latency_ewma_ns × (in_flight + 1)` wins (ties: fewer in flight, then the first drawn).
///   An unmeasured endpoint costs 0, so new endpoints get tried.
/// - **ConsistentHash**: Maglev (see the `maglev` module): `table[key % M]`, M a prime of
///   at least 100 × n (65,537 slots up to 655 endpoints; 1,048,583 slots, 4 MB, at 10,000).
///   If that endpoint is unavailable, excluded or turned down by its ramp, the key probes
///   rehashed slots (up to 24), so only the keys of the endpoint that left move, and they
///   come back when it does.
///
/// Everything outside the table above is bounded the same way for all policies:
/// - **Slow start**: an endpoint with `ramp() = r < 1` is accepted with probability r and
///   otherwise drawn again, so its share is that of weight `r × w`. After 8 such rejections
///   (or 16 draws) the pick takes the best-ramped endpoint it turned down. LeastConn cannot
///   use rejection (a feedback policy offers the endpoint again and again until it is
///   accepted), so it divides the load by `r × w` instead. In P2cEwma the ramp thins how
///   often an endpoint is a candidate, and a new endpoint, unmeasured, still wins the pairs
///   it is in (so it gets up to twice its ramped share until its first answers).
///   ConsistentHash flips a coin fixed per key and endpoint, so the same r keeps the same
///   keys and a growing r only adds keys.
/// - **The fallback scan**: if the bounded fast path meets nothing eligible (say 15 of 16
///   endpoints are down, or excluded), one O(n) pass picks among the eligible ones (weighted
///   random; least loaded for LeastConn; weighted rendezvous hashing on the key for
///   ConsistentHash, so it is still stable per key). With half the weight unavailable it runs
///   for fewer than 1 pick in 60,000. Only this pass can tell that *no* endpoint is
///   available, so panic mode costs O(n).
/// - **Panic mode**: when no eligible endpoint is available, the same policy runs again
///   ignoring availability and ramps; the pick is flagged `panic`.
pub struct Picker {
    policy: Policy,
    weights: Box<[u32]>,
    /// Endpoints of non-zero weight.
    live: usize,
    strategy: Strategy,
}

impl fmt::Debug for Picker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Picker")
            .field("policy", &self.policy)
            .field("endpoints", &self.weights.len())
            .field("with_weight", &self.live)
            .finish_non_exhaustive()
    }
}

/// Least-conn's measure of an endpoint, `requests / weight`, kept as a fraction so that
/// comparing two costs two multiplications rather than two divisions. A weight of 0 (ramp
/// 0) is an infinite load.
#[derive(Clone, Copy)]
struct Load {
    requests: f64,
    weight: f64,
}

impl Load {
    /// Strictly less loaded than `other`.
    #[inline]
    fn below(self, other: Load) -> bool {
        self.requests * other.weight < other.requests * self.weight
    }
}

/// Endpoints turned down by their ramp during one pick.
#[derive(Default)]
struct Held {
    /// The one with the highest ramp, and its ramp.
    best: Option<(usize, f64)>,
    distinct: [usize; RAMP_REJECTIONS],
    count: usize,
}

impl Held {
    /// Records that `index` (ramp `ramp`) was turned down; true once enough have been
    /// (counting each endpoint once when `distinct` is set) to stop drawing.
    fn reject(&mut self, index: usize, ramp: f64, distinct: bool) -> bool {
        if self.best.is_none_or(|(_, r)| ramp > r) {
            self.best = Some((index, ramp));
        }
        if !(distinct && self.distinct[..self.count].contains(&index)) {
            self.distinct[self.count] = index;
            self.count += 1;
        }
        self.count == RAMP_REJECTIONS
    }

    fn take(&self) -> Option<usize> {
        self.best.map(|(i, _)| i)
    }
}

/// The ramp of a candidate, clamped to `0..=1` (NaN reads as 1: no slow start).
#[inline]
fn ramp_of<C: Candidate>(candidate: &C) -> f64 {
    let r = candidate.ramp();
    if r >= 1.0 || r.is_nan() {
        1.0
    } else if r > 0.0 {
        r
    } else {
        0.0
    }
}

impl Picker {
    /// `weights[i]` is endpoint i's weight; 0 means it is never picked.
    ///
    /// For ConsistentHash, endpoints are identified by their position: keys stay put when
    /// endpoints are added or removed at the end of the list, but removing one from the
    /// middle shifts the identities of all those after it, and so most keys. Use
    /// [`Picker::with_identities`] with stable identities (such as `hash_bytes` of each
    /// endpoint's address) when the list can change anywhere.
    pub fn new(policy: Policy, weights: &[u32]) -> Picker {
        let identities: Vec<u64> = (0..weights.len() as u64).collect();
        Self::with_identities(policy, weights, &identities)
    }

    /// Like [`Picker::new`], with `identities[i]` naming endpoint i for consistent hashing
    /// (other policies ignore them): across a rebuild, an endpoint whose identity and weight
    /// stay the same keeps nearly all its keys, wherever it sits in the list (Maglev shifts
    /// a few slots between the others: 0.3% of keys when one endpoint of 10 leaves).
    ///
    /// # Panics
    /// If `identities` and `weights` differ in length.
    pub fn with_identities(policy: Policy, weights: &[u32], identities: &[u64]) -> Picker {
        assert_eq!(weights.len(), identities.len(), "one identity per weight");
        let strategy = match policy {
            Policy::RoundRobin => Strategy::RoundRobin(RoundRobin::new(weights)),
            Policy::LeastConn => Strategy::LeastConn(
                (0..weights.len() as u32)
                    .filter(|&i| weights[i as usize] != 0)
                    .collect(),
            ),
            Policy::Random => Strategy::Random(AliasTable::new(weights)),
            Policy::P2cEwma => Strategy::P2cEwma(AliasTable::new(weights)),
            Policy::ConsistentHash => Strategy::ConsistentHash(Maglev::new(weights, identities)),
        };
        Picker {
            policy,
            weights: weights.into(),
            live: weights.iter().filter(|&&w| w != 0).count(),
            strategy,
        }
    }

    /// The policy this picker was built for.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Picks for one request. `key` is the request's affinity hash (used by ConsistentHash;
    /// others ignore it). `exclude` lists indexes this request already tried (retries go
    /// elsewhere). Returns None only when every endpoint has weight 0 or is excluded.
    /// Prefers available endpoints; if none is available, returns an unavailable one with
    /// `panic: true` (serve all rather than none, Envoy's panic mode).
    ///
    /// `endpoints` should be the list the picker was built for, in the same order; indexes
    /// past its end are treated as absent.
    pub fn pick<C: Candidate>(&self, endpoints: &[C], key: u64, exclude: &[usize]) -> Option<Pick> {
        if self.live == 0 {
            return None;
        }
        if let Some(index) = self.select(endpoints, key, exclude, Mode::Available) {
            return Some(Pick {
                index,
                panic: false,
            });
        }
        self.select(endpoints, key, exclude, Mode::Panic)
            .map(|index| Pick { index, panic: true })
    }

    fn select<C: Candidate>(
        &self,
        endpoints: &[C],
        key: u64,
        exclude: &[usize],
        mode: Mode,
    ) -> Option<usize> {
        match &self.strategy {
            Strategy::RoundRobin(rr) => {
                let ticket = rr.ticket();
                let len = rr.cycle_len();
                self.draw(endpoints, exclude, mode, |attempt| {
                    rr.at(if attempt == 0 {
                        ticket
                    } else {
                        rng::below(len)
                    })
                })
                .or_else(|| self.scan_weighted(endpoints, exclude, mode))
            }
            Strategy::Random(alias) => self
                .draw(endpoints, exclude, mode, |_| alias.sample(rng::next_u64()))
                .or_else(|| self.scan_weighted(endpoints, exclude, mode)),
            Strategy::LeastConn(live) => self.least_conn(live, endpoints, exclude, mode),
            Strategy::P2cEwma(alias) => self.p2c(alias, endpoints, exclude, mode),
            Strategy::ConsistentHash(maglev) => {
                self.consistent(maglev, endpoints, key, exclude, mode)
            }
        }
    }

    /// Whether endpoint `i` may be returned in this mode (ramp aside).
    #[inline]
    fn usable<C: Candidate>(
        &self,
        endpoints: &[C],
        i: usize,
        exclude: &[usize],
        mode: Mode,
    ) -> bool {
        match endpoints.get(i) {
            Some(candidate) => {
                self.weights[i] != 0
                    && !exclude.contains(&i)
                    && (mode == Mode::Panic || candidate.is_available())
            }
            None => false,
        }
    }

    /// Up to `DRAWS` endpoints from `next(attempt)`, the first usable one that its ramp
    /// accepts; or the best-ramped one turned down; or None when none was usable.
    #[inline]
    fn draw<C: Candidate>(
        &self,
        endpoints: &[C],
        exclude: &[usize],
        mode: Mode,
        mut next: impl FnMut(u32) -> usize,
    ) -> Option<usize> {
        let mut held = Held::default();
        for attempt in 0..DRAWS {
            let i = next(attempt);
            if !self.usable(endpoints, i, exclude, mode) {
                continue;
            }
            if mode == Mode::Panic {
                return Some(i);
            }
            let ramp = ramp_of(&endpoints[i]);
            if ramp >= 1.0 || rng::chance(ramp) {
                return Some(i);
            }
            if held.reject(i, ramp, false) {
                break;
            }
        }
        held.take()
    }

    /// The ramp a pass weighs endpoint `i` with.
    #[inline]
    fn ramp_in<C: Candidate>(candidate: &C, mode: Mode) -> f64 {
        match mode {
            Mode::Available => ramp_of(candidate),
            Mode::Panic => 1.0,
        }
    }

    /// O(n): a weighted random usable endpoint (one-pass weighted reservoir sampling),
    /// weights scaled by ramp.
    fn scan_weighted<C: Candidate>(
        &self,
        endpoints: &[C],
        exclude: &[usize],
        mode: Mode,
    ) -> Option<usize> {
        let mut total = 0.0;
        let mut chosen = None;
        for i in 0..self.weights.len().min(endpoints.len()) {
            if !self.usable(endpoints, i, exclude, mode) {
                continue;
            }
            let weight =
                f64::from(self.weights[i]) * Self::ramp_in(&endpoints[i], mode).max(MIN_RAMP);
            total += weight;
            if rng::unit() * total < weight {
                chosen = Some(i);
            }
        }
        chosen
    }

    /// `(in_flight + 1) / (weight × ramp)`: lower is less loaded.
    #[inline]
    fn load<C: Candidate>(&self, endpoints: &[C], i: usize, mode: Mode) -> Load {
        let candidate = &endpoints[i];
        Load {
            requests: candidate.in_flight() as f64 + 1.0,
            weight: f64::from(self.weights[i]) * Self::ramp_in(candidate, mode),
        }
    }

    fn least_conn<C: Candidate>(
        &self,
        live: &[u32],
        endpoints: &[C],
        exclude: &[usize],
        mode: Mode,
    ) -> Option<usize> {
        let n = self.weights.len().min(endpoints.len());
        if n == 0 {
            return None;
        }
        if n > EXACT_LEAST_CONN {
            let mut best: Option<(usize, Load)> = None;
            let mut found = 0;
            for _ in 0..DRAWS {
                let i = live[rng::below(live.len())] as usize;
                if !self.usable(endpoints, i, exclude, mode) {
                    continue;
                }
                let load = self.load(endpoints, i, mode);
                if best.is_none_or(|(_, b)| load.below(b)) {
                    best = Some((i, load));
                }
                found += 1;
                if found == LEAST_CONN_CHOICES {
                    break;
                }
            }
            if let Some((i, _)) = best {
                return Some(i);
            }
        }
        // Exact: every endpoint, from a random start so that ties spread.
        let start = rng::below(n);
        let mut best: Option<(usize, Load)> = None;
        for step in 0..n {
            let i = if start + step < n {
                start + step
            } else {
                start + step - n
            };
            if !self.usable(endpoints, i, exclude, mode) {
                continue;
            }
            let load = self.load(endpoints, i, mode);
            if best.is_none_or(|(_, b)| load.below(b)) {
                best = Some((i, load));
            }
        }
        best.map(|(i, _)| i)
    }

    fn p2c<C: Candidate>(
        &self,
        alias: &AliasTable,
        endpoints: &[C],
        exclude: &[usize],
        mode: Mode,
    ) -> Option<usize> {
        let mut held = Held::default();
        let mut first: Option<usize> = None;
        let mut second_draws = if self.live > 1 { SECOND_DRAWS } else { 0 };
        for _ in 0..DRAWS {
            if first.is_some() {
                if second_draws == 0 {
                    break;
                }
                second_draws -= 1;
            }
            let i = alias.sample(rng::next_u64());
            if first == Some(i) || !self.usable(endpoints, i, exclude, mode) {
                continue;
            }
            if mode == Mode::Available {
                let ramp = ramp_of(&endpoints[i]);
                if ramp < 1.0 && !rng::chance(ramp) {
                    if held.reject(i, ramp, false) {
                        break;
                    }
                    continue;
                }
            }
            match first {
                None => first = Some(i),
                Some(a) => return Some(Self::cheaper(endpoints, a, i)),
            }
        }
        match first {
            // The draws kept returning the first candidate (a small pool, or one endpoint
            // with most of the weight): walk from a random index to another usable one.
            Some(a) if self.live > 1 => {
                let n = self.weights.len().min(endpoints.len());
                let start = rng::below(n);
                for step in 0..(n as u32).min(DRAWS) as usize {
                    let i = (start + step) % n;
                    if i == a || !self.usable(endpoints, i, exclude, mode) {
                        continue;
                    }
                    let ramp = Self::ramp_in(&endpoints[i], mode);
                    if ramp >= 1.0 || rng::chance(ramp) {
                        return Some(Self::cheaper(endpoints, a, i));
                    }
                }
                Some(a)
            }
            Some(a) => Some(a),
            None => held
                .take()
                .or_else(|| self.scan_weighted(endpoints, exclude, mode)),
        }
    }

    /// Of two candidates, the one with the lower latency × (in flight + 1); ties go to fewer
    /// in flight, then to `a`.
    #[inline]
    fn cheaper<C: Candidate>(endpoints: &[C], a: usize, b: usize) -> usize {
        let cost = |i: usize| {
            let c = &endpoints[i];
            let in_flight = c.in_flight();
            (
                u128::from(c.latency_ewma_ns()) * (u128::from(in_flight) + 1),
                in_flight,
            )
        };
        if cost(b) < cost(a) { b } else { a }
    }

    fn consistent<C: Candidate>(
        &self,
        maglev: &Maglev,
        endpoints: &[C],
        key: u64,
        exclude: &[usize],
        mode: Mode,
    ) -> Option<usize> {
        if maglev.is_empty() {
            return None;
        }
        let mut held = Held::default();
        for probe in 0..HASH_PROBES {
            let i = maglev.probe(key, probe);
            if !self.usable(endpoints, i, exclude, mode) {
                continue;
            }
            if mode == Mode::Panic {
                return Some(i);
            }
            let ramp = ramp_of(&endpoints[i]);
            if ramp >= 1.0 || maglev.ramp_coin(key, i) < ramp {
                return Some(i);
            }
            // The coin is fixed per key and endpoint: meeting the endpoint again in a later
            // slot is no new rejection.
            if held.reject(i, ramp, true) {
                break;
            }
        }
        if let Some(i) = held.take() {
            return Some(i);
        }
        // O(n): weighted rendezvous hashing over the usable endpoints, still stable per key.
        let mut best: Option<(usize, f64)> = None;
        for i in 0..self.weights.len().min(endpoints.len()) {
            if !self.usable(endpoints, i, exclude, mode) {
                continue;
            }
            let weight =
                f64::from(self.weights[i]) * Self::ramp_in(&endpoints[i], mode).max(MIN_RAMP);
            let score = maglev.rendezvous(key, i, weight);
            if best.is_none_or(|(_, b)| score < b) {
                best = Some((i, score));
            }
        }
        best.map(|(i, _)| i)
    }
}

#[cfg(test)]
mod tests;
