//! TLS session tickets without a lock: the keys that seal a listener's session state into
//! the tickets its clients bring back to resume (RFC 8446 section 4.6.1, RFC 5077).
//!
//! rustls' own ticketer guards its keys with a read-write lock taken on every ticket. Here the
//! keys are behind an `ArcSwap`: sealing or opening a ticket loads the pointer, so a handshake
//! never waits for another.
//!
//! By default keys live in memory only and are made at random. A key seals tickets for
//! [`ROTATE_EVERY`] and opens them for one period more, then is dropped; so a ticket is good
//! for one to two periods, and what a stolen key can decrypt is bounded by that (forward
//! secrecy). The rotation happens on the first ticket sealed after the period, by whichever
//! handshake gets there: a compare-and-swap, so two handshakes racing to rotate make one new
//! key.
//!
//! Gateways that share their clients (behind one address, or one DNS name) share keys through
//! files instead, as with nginx's `ssl_session_ticket_key`: the first file's key seals, every
//! listed key opens, and rotating them is the operator's, by rewriting the files
//! ([`read_key_files`]; `crate::tls` reloads them when they change).
//!
//! A ticket is the key's name (16 random bytes, to find the key), a 12-byte random nonce, then
//! the state sealed with AES-256-GCM, the name as associated data. The nonce is random, not a
//! count, because a client shows its ticket in the clear: a count would tell an onlooker when
//! the ticket was issued and how many others were. Random 96-bit nonces stay safe under one
//! key for 2^32 tickets (NIST SP 800-38D), some 200,000 a second for the key's 6 hours.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf::{HKDF_SHA256, Salt};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::server::ProducesTickets;

/// How long a key seals tickets before a new one takes over; it opens them for as long again.
/// Clients are told a ticket is good for this long, whether the keys rotate or come from
/// files.
const ROTATE_EVERY: Duration = Duration::from_secs(6 * 60 * 60);

const NAME_LEN: usize = 16;

/// The sizes of a key file: nginx's two (16 bytes of name, then 32 or 64 of secret).
const FILE_SIZES: [usize; 2] = [48, 80];

/// One listener's ticket keys.
pub(crate) struct Tickets {
    keys: ArcSwap<Keys>,
    /// None when the keys come from files, which rotate when the operator rewrites them.
    rotate_every: Option<Duration>,
}

/// The key that seals tickets now, and the older ones, which still open theirs: the one
/// before it when keys rotate, the other listed files' keys when they come from files.
struct Keys {
    current: Arc<Key>,
    older: Vec<Arc<Key>>,
    made: Instant,
}

pub(crate) struct Key {
    name: [u8; NAME_LEN],
    aead: LessSafeKey,
    /// A digest of the secret, to tell two keys with one name apart.
    check: [u8; 32],
}

impl Key {
    fn random() -> Option<Self> {
        let mut bytes = [0; 48];
        SystemRandom::new().fill(&mut bytes).ok()?;
        Self::from_bytes(&bytes).ok()
    }

    /// A key from a file's bytes: the first 16 name it, the rest (32 or 64 bytes) is the
    /// secret from which the AES-256-GCM key is derived with HKDF-SHA256. Deriving gives
    /// both sizes a full-strength key, and a file that nginx also reads a key of drover's
    /// own.
    fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        if !FILE_SIZES.contains(&bytes.len()) {
            return Err(format!(
                "it holds {} bytes; a session ticket key is 48 or 80 random bytes, such as `openssl rand 80` writes",
                bytes.len()
            ));
        }
        let (name, secret) = bytes.split_at(NAME_LEN);
        let prk = Salt::new(HKDF_SHA256, b"drover session ticket key").extract(secret);
        let okm = prk
            .expand(&[b"aes-256-gcm"], &AES_256_GCM)
            .map_err(|_| "cannot derive a key from it".to_string())?;
        let mut check = [0; 32];
        prk.expand(&[b"check"], HKDF_SHA256)
            .and_then(|okm| okm.fill(&mut check))
            .map_err(|_| "cannot derive a key from it".to_string())?;
        Ok(Self {
            name: name.try_into().expect("16 bytes"),
            aead: LessSafeKey::new(UnboundKey::from(okm)),
            check,
        })
    }
}

/// Reads a listener's `tls.session_ticket_keys`; the first key seals. The error names the
/// file and what is wrong with it.
pub(crate) fn read_key_files(files: &[PathBuf]) -> Result<Vec<Key>, String> {
    let mut keys: Vec<Key> = Vec::with_capacity(files.len());
    for (i, path) in files.iter().enumerate() {
        let at = || format!("tls.session_ticket_keys[{i}] {}", path.display());
        let bytes = drover_certs::read(path).map_err(|e| format!("{}: {e}", at()))?;
        let key = Key::from_bytes(&bytes).map_err(|e| format!("{}: {e}", at()))?;
        // The same file twice is harmless (it happens half-way through a rotation); one name
        // for two secrets would leave the second's tickets unopened.
        if let Some(j) = keys
            .iter()
            .position(|k| k.name == key.name && k.check != key.check)
        {
            return Err(format!(
                "{}: its first 16 bytes, which name the key, are those of tls.session_ticket_keys[{j}] with another secret; make each key afresh, such as with `openssl rand 80`",
                at()
            ));
        }
        keys.push(key);
    }
    Ok(keys)
}

impl Tickets {
    /// New keys for a listener, made at random and rotated; None if the system's random
    /// source failed.
    pub(crate) fn new() -> Option<Self> {
        Self::rotating_every(ROTATE_EVERY)
    }

    fn rotating_every(rotate_every: Duration) -> Option<Self> {
        Some(Self {
            keys: ArcSwap::from_pointee(Keys {
                current: Arc::new(Key::random()?),
                older: Vec::new(),
                made: Instant::now(),
            }),
            rotate_every: Some(rotate_every),
        })
    }

    /// Keys read from files ([`read_key_files`], which gives at least one): the first
    /// seals, all open, none rotates.
    pub(crate) fn from_files(keys: Vec<Key>) -> Self {
        Self {
            keys: ArcSwap::new(Self::listed(keys)),
            rotate_every: None,
        }
    }

    /// Puts keys read again from their files in force, for the handshakes after this.
    pub(crate) fn replace(&self, keys: Vec<Key>) {
        self.keys.store(Self::listed(keys));
    }

    fn listed(keys: Vec<Key>) -> Arc<Keys> {
        let mut keys = keys.into_iter().map(Arc::new);
        let current = keys.next().expect("at least one key file");
        Arc::new(Keys {
            current,
            older: keys.collect(),
            made: Instant::now(),
        })
    }

    /// Makes a new current key if the one in use is due, keeping it as the previous one. If
    /// the random source fails, the current key goes on sealing until the next try.
    fn rotate_if_due(&self, now: Instant) {
        let Some(every) = self.rotate_every else {
            return;
        };
        let seen = self.keys.load();
        if let Some(next) = Self::next_keys(every, &seen, now) {
            self.install(&seen, next);
        }
    }

    /// The keys after `seen` if its current key is due.
    fn next_keys(every: Duration, seen: &Keys, now: Instant) -> Option<Arc<Keys>> {
        if now.duration_since(seen.made) < every {
            return None;
        }
        Some(Arc::new(Keys {
            current: Arc::new(Key::random()?),
            older: vec![seen.current.clone()],
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
        let every = self.rotate_every.unwrap_or(ROTATE_EVERY);
        every.as_secs().try_into().unwrap_or(u32::MAX)
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
            .chain(&keys.older)
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

    /// Key files in a fresh directory: name → contents.
    fn key_files(files: &[(&str, &[u8])]) -> (tempfile::TempDir, Vec<PathBuf>) {
        let dir = tempfile::tempdir().unwrap();
        let paths = files
            .iter()
            .map(|(name, bytes)| {
                let path = dir.path().join(name);
                std::fs::write(&path, bytes).unwrap();
                path
            })
            .collect();
        (dir, paths)
    }

    #[test]
    fn gateways_reading_the_same_key_files_open_each_other_s_tickets() {
        let (a, b) = ([7u8; 80], [9u8; 48]);
        let (_dir, paths) = key_files(&[("new.key", &a), ("old.key", &b)]);
        let here = Tickets::from_files(read_key_files(&paths).unwrap());
        let there = Tickets::from_files(read_key_files(&paths).unwrap());
        let ticket = sealed(&here, b"state");
        assert_eq!(
            ticket[..NAME_LEN],
            a[..NAME_LEN],
            "the first file's key seals"
        );
        assert_eq!(there.decrypt(&ticket).as_deref(), Some(&b"state"[..]));
        assert_eq!(here.lifetime(), 6 * 3600);

        // Rotated on one gateway: the old key moves to the second file, a new one comes first.
        let (_dir, rotated) = key_files(&[("new.key", &[3u8; 80]), ("old.key", &a)]);
        there.replace(read_key_files(&rotated).unwrap());
        let newer = sealed(&there, b"newer");
        assert_eq!(newer[..NAME_LEN], [3u8; NAME_LEN]);
        assert_eq!(there.decrypt(&ticket).as_deref(), Some(&b"state"[..]));
        assert_eq!(here.decrypt(&newer), None, "not rotated here yet");

        // Keys from files never rotate by themselves.
        let start = there.keys.load().made;
        there.rotate_if_due(start + 3 * ROTATE_EVERY);
        assert_eq!(sealed(&there, b"x")[..NAME_LEN], [3u8; NAME_LEN]);
    }

    #[test]
    fn a_key_file_of_another_size_or_a_name_given_twice_is_refused() {
        let (_dir, paths) = key_files(&[("short.key", &[1u8; 32])]);
        let e = read_key_files(&paths).err().unwrap();
        assert_eq!(
            e,
            format!(
                "tls.session_ticket_keys[0] {}: it holds 32 bytes; a session ticket key is 48 or 80 random bytes, such as `openssl rand 80` writes",
                paths[0].display()
            )
        );
        let e = read_key_files(&[paths[0].with_file_name("missing.key")])
            .err()
            .unwrap();
        assert!(e.ends_with("missing.key: no such file"), "{e}");

        let mut other = [5u8; 80];
        other[40] = 6;
        let (_dir, paths) = key_files(&[("a", &[5u8; 80]), ("b", &[5u8; 80]), ("c", &other)]);
        assert_eq!(
            read_key_files(&paths[..2]).unwrap().len(),
            2,
            "the same key twice"
        );
        let e = read_key_files(&paths).err().unwrap();
        assert!(
            e.contains("[2]")
                && e.contains("are those of tls.session_ticket_keys[0] with another secret"),
            "{e}"
        );
    }

    #[test]
    fn of_two_handshakes_racing_to_rotate_the_first_keys_stay() {
        let t = Tickets::rotating_every(HOUR).unwrap();
        let seen = t.keys.load_full();
        let due = seen.made + HOUR;
        let (a, b) = (
            Tickets::next_keys(HOUR, &seen, due).unwrap(),
            Tickets::next_keys(HOUR, &seen, due).unwrap(),
        );
        t.install(&seen, a);
        let ticket = sealed(&t, b"state");
        t.install(&seen, b);
        assert_eq!(t.decrypt(&ticket).as_deref(), Some(&b"state"[..]));
        assert_eq!(sealed(&t, b"x")[..NAME_LEN], ticket[..NAME_LEN]);
        assert!(
            Tickets::next_keys(HOUR, &t.keys.load(), due).is_none(),
            "rotated once"
        );
    }
}
