//! Stable hashing for affinity keys, and the integer mixers the pickers share.
//!
//! `hash_bytes` is a pure function of its input: no per-process seed, no dependence on the
//! platform's endianness or word size. Two drover instances behind one VIP therefore send the
//! same client to the same endpoint, and a key hashed today hashes the same after an upgrade
//! (a test pins known answers). The price of being unseeded is that it is not resistant to
//! hash flooding: a client can choose inputs that collide. That is harmless here, since a
//! client that controls its affinity key can already choose its endpoint.

/// The golden ratio in 64-bit fixed point: an odd constant with well spread bits.
pub(crate) const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

const K1: u64 = 0xbf58_476d_1ce4_e5b9;
const K2: u64 = 0x94d0_49bb_1331_11eb;
const K3: u64 = 0xd6e8_feb8_6659_fd93;

/// A bijective 64-bit finaliser (the splitmix64 output function): every input bit affects
/// every output bit. Used to spread keys, identities and probe numbers over tables.
#[inline]
pub(crate) fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(K1);
    x = (x ^ (x >> 27)).wrapping_mul(K2);
    x ^ (x >> 31)
}

/// A uniform number in `[0, 1)` derived from a hash (its top 53 bits).
#[inline]
pub(crate) fn unit_from(hash: u64) -> f64 {
    (hash >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// The 128-bit product of two words, its halves xored together.
#[inline]
fn fold(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

#[inline]
fn read_u64(bytes: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(word)
}

/// A fast, stable 64-bit hash of bytes, for affinity keys: a client IP's octets, a header's
/// or a cookie's value, a path. The same input gives the same output in every process, on
/// every platform, in every version (pinned by a test).
///
/// Each 16-byte block is folded through a 64×64→128-bit multiply and chained into the
/// state with a rotate and a multiply (so the order of blocks matters); the length is mixed
/// in at both ends, and a final avalanche spreads every input bit over the output. Not
/// keyed, so not resistant to chosen collisions (see the module docs).
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let len = bytes.len() as u64;
    let mut state = GOLDEN ^ len.wrapping_mul(K1);
    let mut blocks = bytes.chunks_exact(16);
    for block in &mut blocks {
        let a = read_u64(&block[..8]);
        let b = read_u64(&block[8..]);
        state = (state.rotate_left(29) ^ fold(a ^ K1, b ^ K2)).wrapping_mul(K3);
    }
    let rest = blocks.remainder();
    if !rest.is_empty() {
        let mut tail = [0u8; 16];
        tail[..rest.len()].copy_from_slice(rest);
        let a = read_u64(&tail[..8]);
        let b = read_u64(&tail[8..]);
        state = (state.rotate_left(29) ^ fold(a ^ K2, b ^ K3)).wrapping_mul(K1);
    }
    mix64(state ^ len.rotate_left(32))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn known_answers_never_change() {
        // Pinned: changing any of these moves every client of every consistent-hash service
        // and breaks agreement between drover instances of different versions.
        let pinned: [(&[u8], u64); 6] = [
            (b"", 0xe220_a839_7b1d_cdaf),
            (b"a", 0xaa10_6ccf_634f_84c7),
            (b"10.0.0.1", 0x8b5c_56dc_0a3c_9f5d),
            (&[192, 168, 1, 20], 0x8c0a_cc20_0dc6_e7a2),
            (b"/api/v1/users/42", 0x0bbf_5253_014d_1982),
            (
                b"session=0123456789abcdef0123456789abcdef",
                0x7fc8_d111_1ffc_275e,
            ),
        ];
        for (input, expected) in pinned {
            assert_eq!(
                hash_bytes(input),
                expected,
                "hash_bytes({:?}) = {:#x}",
                String::from_utf8_lossy(input),
                hash_bytes(input)
            );
        }
    }

    #[test]
    fn nearby_inputs_give_unrelated_outputs() {
        // Every one-byte change, every length from 0 to 64, and every IPv4 address of a /16:
        // no collisions, and each output bit is set about half of the time.
        let mut seen = HashSet::new();
        let mut ones = [0u32; 64];
        let mut count = 0u32;
        let mut add = |h: u64| {
            assert!(seen.insert(h), "collision");
            for (bit, n) in ones.iter_mut().enumerate() {
                *n += ((h >> bit) & 1) as u32;
            }
            count += 1;
        };
        for len in 0..=64 {
            add(hash_bytes(&vec![0u8; len]));
        }
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                add(hash_bytes(&[10, 1, a, b]));
            }
        }
        let base = b"some header value of a cookie".to_vec();
        for i in 0..base.len() {
            for flip in 0..8 {
                let mut v = base.clone();
                v[i] ^= 1 << flip;
                add(hash_bytes(&v));
            }
        }
        for n in ones {
            let share = f64::from(n) / f64::from(count);
            assert!(
                (0.48..0.52).contains(&share),
                "bit set in {share} of outputs"
            );
        }
    }

    #[test]
    fn mixers_spread_small_integers() {
        let buckets = 64;
        let mut hits = vec![0u32; buckets];
        for i in 0..64_000u64 {
            hits[(mix64(i) % buckets as u64) as usize] += 1;
        }
        assert!(hits.iter().all(|&h| (800..1200).contains(&h)), "{hits:?}");
        assert!((0.0..1.0).contains(&unit_from(u64::MAX)));
        assert_eq!(unit_from(0), 0.0);
    }
}
