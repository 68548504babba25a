//! The API-key format (DESIGN §4), shared because billing mints keys and the gateway must reject malformed
//! ones before any lookup: `pg_live_<33 base62 random characters><6 base62 characters of CRC-32>`.
//!
//! 33 base62 characters carry 196 bits of randomness. The checksum covers everything before it, so a typo
//! is caught locally and secret scanners can confirm a match without calling us.

/// Every key starts with this; secret scanners match on it.
pub const PREFIX: &str = "pg_live_";
/// Number of random base62 characters after the prefix.
pub const RANDOM_LEN: usize = 33;
/// Number of base62 characters encoding the CRC-32 checksum (62^6 > 2^32).
pub const CHECKSUM_LEN: usize = 6;
/// Total length of a well-formed key.
pub const KEY_LEN: usize = PREFIX.len() + RANDOM_LEN + CHECKSUM_LEN;
/// Length of the display prefix billing stores and lists (`pg_live_` plus four characters).
pub const DISPLAY_PREFIX_LEN: usize = PREFIX.len() + 4;

/// The base62 alphabet, in the order digits map to characters.
pub const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Returns the checksum characters for `body` (prefix plus random part).
pub fn checksum(body: &str) -> [u8; CHECKSUM_LEN] {
    let mut value = u64::from(crc32fast::hash(body.as_bytes()));
    let mut encoded = [b'0'; CHECKSUM_LEN];
    for slot in encoded.iter_mut().rev() {
        *slot = ALPHABET[(value % 62) as usize];
        value /= 62;
    }
    encoded
}

/// Builds a key from its random part. `random` must be `RANDOM_LEN` base62 characters.
pub fn assemble(random: &str) -> String {
    debug_assert_eq!(random.len(), RANDOM_LEN);
    let mut key = String::with_capacity(KEY_LEN);
    key.push_str(PREFIX);
    key.push_str(random);
    let sum = checksum(&key);
    key.extend(sum.iter().map(|&byte| char::from(byte)));
    key
}

/// Tells whether `key` has the prefix, the length, the alphabet and a matching checksum. It does not say
/// whether the key exists.
pub fn is_well_formed(key: &str) -> bool {
    if key.len() != KEY_LEN || !key.starts_with(PREFIX) {
        return false;
    }
    let (body, sum) = key.split_at(KEY_LEN - CHECKSUM_LEN);
    body[PREFIX.len()..]
        .bytes()
        .all(|byte| byte.is_ascii_alphanumeric())
        && sum.as_bytes() == checksum(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RANDOM: &str = "0123456789abcdefghijABCDEFGHIJxyz";

    #[test]
    fn an_assembled_key_is_well_formed() {
        let key = assemble(RANDOM);

        assert_eq!(key.len(), KEY_LEN);
        assert!(is_well_formed(&key));
    }

    #[test]
    fn a_single_changed_character_fails_the_checksum() {
        let key = assemble(RANDOM);
        let typo = key.replacen('a', "b", 1);

        assert!(!is_well_formed(&typo));
    }

    #[test]
    fn wrong_prefix_length_or_alphabet_is_rejected() {
        let key = assemble(RANDOM);

        assert!(!is_well_formed(&key.replacen("pg_live_", "pg_test_", 1)));
        assert!(!is_well_formed(&key[..KEY_LEN - 1]));
        assert!(!is_well_formed(&format!("{key}0")));
        assert!(!is_well_formed(&key.replacen('x', "-", 1)));
        assert!(!is_well_formed(""));
    }
}
