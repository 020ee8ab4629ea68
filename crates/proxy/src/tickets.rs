//! TLS session tickets without a lock: the keys that seal a listener's session state into
//! the tickets its clients bring back to resume (RFC 8446 section 4.6.1, RFC 5077).
//!
//! rustls' own ticketer guards its keys with a read-write lock taken on every ticket. Here the
//! keys are behind an `ArcSwap`: sealing or opening a ticket loads the pointer, so a handshake
//! never waits for another.
//!
//! Keys live in memory only and are made at random. A key seals tickets for [`ROTATE_EVERY`]
//! and opens them for one period more, then is dropped; so a ticket is good for one to two
//! periods, and what a stolen key can decrypt is bounded by that (forward secrecy). The
//! rotation happens on the first ticket sealed after the period, by whichever handshake gets
//! there: a compare-and-swap, so two handshakes racing to rotate make one new key.
//!
//! A ticket is the key's name (16 random bytes, to find the key), a 12-byte random nonce, then
//! the state sealed with AES-256-GCM, the name as associated data. The nonce is random, not a
//! count, because a client shows its ticket in the clear: a count would tell an onlooker when
//! the ticket was issued and how many others were. Random 96-bit nonces stay safe under one
//! key for 2^32 tickets (NIST SP 800-38D), some 200,000 a second for the key's 6 hours.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::server::ProducesTickets;

/// How long a key seals tickets before a new one takes over; it opens them for as long again.
const ROTATE_EVERY: Duration = Duration::from_secs(6 * 60 * 60);

const NAME_LEN: usize = 16;

/// One listener's ticket keys.
pub(crate) struct Tickets {
    keys: ArcSwap<Keys>,
    rotate_every: Duration,
}

/// The key that seals tickets now, and the one before it, which still opens its tickets.
struct Keys {
    current: Arc<Key>,
    previous: Option<Arc<Key>>,
    made: Instant,
}

struct Key {
    name: [u8; NAME_LEN],
    aead: LessSafeKey,
}

impl Key {
    fn random() -> Option<Self> {
        let rng = SystemRandom::new();
        let mut name = [0; NAME_LEN];
        let mut secret = [0; 32];
        rng.fill(&mut name).ok()?;
        rng.fill(&mut secret).ok()?;
        let aead = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &secret).ok()?);
        Some(Self { name, aead })
    }
}

impl Tickets {
    /// New keys for a listener; None if the system's random source failed.
    pub(crate) fn new() -> Option<Self> {
        Self::rotating_every(ROTATE_EVERY)
    }

    fn rotating_every(rotate_every: Duration) -> Option<Self> {
        Some(Self {
            keys: ArcSwap::from_pointee(Keys {
                current: Arc::new(Key::random()?),
                previous: None,
                made: Instant::now(),
            }),
            rotate_every,
        })
    }

    /// Makes a new current key if the one in use is due, keeping it as the previous one. If
    /// the random source fails, the current key goes on sealing until the next try.
    fn rotate_if_due(&self, now: Instant) {
        let seen = self.keys.load();
        if let Some(next) = self.next_keys(&seen, now) {
            self.install(&seen, next);
        }
    }

    /// The keys after `seen` if its current key is due.
    fn next_keys(&self, seen: &Keys, now: Instant) -> Option<Arc<Keys>> {
        if now.duration_since(seen.made) < self.rotate_every {
            return None;
        }
        Some(Arc::new(Keys {
            current: Arc::new(Key::random()?),
            previous: Some(seen.current.clone()),
            made: now,
        }))
    }

    /// Puts `next` in force unless another handshake rotated since `seen` was loaded: then
    /// its new key stays, with the tickets it may have sealed already.
    fn install(&self, seen: &Arc<Keys>, next: Arc<Keys>) {
        let _ = self.keys.compare_and_swap(seen, next);
    }
}

impl fmt::Debug for Tickets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tickets")
            .field("rotate_every", &self.rotate_every)
            .finish_non_exhaustive()
    }
}

impl ProducesTickets for Tickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        // A ticket is good for at least one period, whenever in its key's period it was made.
        self.rotate_every.as_secs().try_into().unwrap_or(u32::MAX)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.rotate_if_due(Instant::now());
        let keys = self.keys.load();
        let key = &keys.current;
        let mut nonce = [0; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).ok()?;
        let tag_len = AES_256_GCM.tag_len();
        let mut ticket = Vec::with_capacity(NAME_LEN + NONCE_LEN + plain.len() + tag_len);
        ticket.extend_from_slice(&key.name);
        ticket.extend_from_slice(&nonce);
        ticket.extend_from_slice(plain);
        let tag = key
            .aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&key.name),
                &mut ticket[NAME_LEN + NONCE_LEN..],
            )
            .ok()?;
        ticket.extend_from_slice(tag.as_ref());
        Some(ticket)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() < NAME_LEN + NONCE_LEN + AES_256_GCM.tag_len() {
            return None;
        }
        let (name, rest) = cipher.split_at(NAME_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let keys = self.keys.load();
        let key = std::iter::once(&keys.current)
            .chain(&keys.previous)
            .find(|k| k.name == name)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut plain = sealed.to_vec();
        let len = key
            .aead
            .open_in_place(nonce, Aad::from(&key.name), &mut plain)
            .ok()?
            .len();
        plain.truncate(len);
        Some(plain)
    }
}

/// For fuzzing (`fuzz/fuzz_targets/session_ticket.rs`): `data` offered as a ticket to a
/// listener's keys, as a client's ClientHello can, both as it is and after the name of the
/// key in use (which a fuzzer could not guess, and without which the cipher is never
/// reached); then `data` sealed as session state and opened again. Returns whether either
/// offer opened (only a forgery would). Panics if the state sealed does not open to itself.
pub fn fuzz_session_ticket(data: &[u8]) -> bool {
    static TICKETS: std::sync::OnceLock<Tickets> = std::sync::OnceLock::new();
    let tickets = TICKETS.get_or_init(|| Tickets::new().expect("a random source"));
    let mut named = tickets.keys.load().current.name.to_vec();
    named.extend_from_slice(data);
    let forged = tickets.decrypt(data).is_some() || tickets.decrypt(&named).is_some();
    let ticket = tickets.encrypt(data).expect("a ticket");
    assert_eq!(tickets.decrypt(&ticket).as_deref(), Some(data));
    forged
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn sealed(t: &Tickets, plain: &[u8]) -> Vec<u8> {
        t.encrypt(plain).expect("a ticket")
    }

    #[test]
    fn a_ticket_opens_to_what_was_sealed_and_no_two_tickets_are_alike() {
        let t = Tickets::new().unwrap();
        let a = sealed(&t, b"session state");
        let b = sealed(&t, b"session state");
        assert_ne!(a, b, "each ticket has its own nonce");
        assert!(
            !a.windows(13).any(|w| w == b"session state"),
            "sealed, not plain"
        );
        assert_eq!(t.decrypt(&a).as_deref(), Some(&b"session state"[..]));
        assert_eq!(t.decrypt(&b).as_deref(), Some(&b"session state"[..]));
        assert_eq!(t.decrypt(&sealed(&t, b"")).as_deref(), Some(&b""[..]));
    }

    #[test]
    fn a_changed_cut_or_foreign_ticket_does_not_open() {
        let t = Tickets::new().unwrap();
        let ticket = sealed(&t, b"session state");
        for i in 0..ticket.len() {
            let mut bad = ticket.clone();
            bad[i] ^= 0x01;
            assert_eq!(t.decrypt(&bad), None, "byte {i} flipped");
        }
        for len in 0..ticket.len() {
            assert_eq!(t.decrypt(&ticket[..len]), None, "cut to {len} bytes");
        }
        let other = Tickets::new().unwrap();
        assert_eq!(other.decrypt(&ticket), None, "another listener's key");
    }

    #[test]
    fn a_key_seals_for_one_period_and_opens_for_two() {
        let t = Tickets::rotating_every(HOUR).unwrap();
        let start = t.keys.load().made;
        let first = sealed(&t, b"one");
        t.rotate_if_due(start + HOUR / 2);
        assert_eq!(t.decrypt(&first).as_deref(), Some(&b"one"[..]));
        assert_eq!(
            first[..NAME_LEN],
            sealed(&t, b"x")[..NAME_LEN],
            "not due yet"
        );

        t.rotate_if_due(start + HOUR);
        let second = sealed(&t, b"two");
        assert_ne!(first[..NAME_LEN], second[..NAME_LEN], "a new key seals");
        assert_eq!(
            t.decrypt(&first).as_deref(),
            Some(&b"one"[..]),
            "still opens"
        );
        assert_eq!(t.decrypt(&second).as_deref(), Some(&b"two"[..]));

        t.rotate_if_due(start + 2 * HOUR);
        assert_eq!(t.decrypt(&first), None, "its key is gone");
        assert_eq!(t.decrypt(&second).as_deref(), Some(&b"two"[..]));
        assert_eq!(t.lifetime(), 3600);
    }

    #[test]
    fn of_two_handshakes_racing_to_rotate_the_first_keys_stay() {
        let t = Tickets::rotating_every(HOUR).unwrap();
        let seen = t.keys.load_full();
        let due = seen.made + HOUR;
        let (a, b) = (
            t.next_keys(&seen, due).unwrap(),
            t.next_keys(&seen, due).unwrap(),
        );
        t.install(&seen, a);
        let ticket = sealed(&t, b"state");
        t.install(&seen, b);
        assert_eq!(t.decrypt(&ticket).as_deref(), Some(&b"state"[..]));
        assert_eq!(sealed(&t, b"x")[..NAME_LEN], ticket[..NAME_LEN]);
        assert!(t.next_keys(&t.keys.load(), due).is_none(), "rotated once");
    }
}
