//! Personal access tokens (SPEC §4 "PAT", §5).
//!
//! Owns the PAT format (prefix, 30 base62 characters, 6-character base62
//! CRC-32 checksum), minting new ones, the `tokens.yaml` record format and
//! the hash-indexed store. A PAT is only ever compared by its SHA-256: the
//! secret is hashed on arrival and never kept, logged or compared directly.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{AuthError, Principal, is_safe_identity};
use crate::scope::{Cube, CubeSpec, Strictness, Vocabulary, cube_list};

pub const PREFIX: &str = "abx_pat_";
const RANDOM_LEN: usize = 30;
const CHECKSUM_LEN: usize = 6;
/// Total length of a PAT.
pub const LEN: usize = PREFIX.len() + RANDOM_LEN + CHECKSUM_LEN;
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// CRC-32 of `random` written in base 62, most significant first, 6 wide.
fn checksum(random: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut n = crc32fast::hash(random);
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    out
}

/// Whether `token` has the PAT shape and a correct checksum. No lookup.
pub fn well_formed(token: &str) -> bool {
    let b = token.as_bytes();
    if b.len() != LEN || !token.starts_with(PREFIX) {
        return false;
    }
    let body = &b[PREFIX.len()..];
    if !body.iter().all(u8::is_ascii_alphanumeric) {
        return false;
    }
    let (random, check) = body.split_at(RANDOM_LEN);
    checksum(random) == check
}

/// Lowercase-hex-decodable SHA-256 of the whole token string.
pub fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Fill `out` from `*i` on with the base-62 characters `bytes` give, by
/// rejection sampling: a byte from 248 up would bias the modulo (248 is
/// 4 × 62) and is skipped. Stops when `out` is full.
fn base62_into(out: &mut [u8], i: &mut usize, bytes: &[u8]) {
    for &b in bytes {
        let Some(slot) = out.get_mut(*i) else {
            return;
        };
        if b < 248 {
            *slot = BASE62[(b % 62) as usize];
            *i += 1;
        }
    }
}

/// Mint a new PAT from the operating system's random source.
pub fn mint() -> Result<String, getrandom::Error> {
    let mut random = [0u8; RANDOM_LEN];
    let mut i = 0;
    let mut buf = [0u8; 64];
    while i < RANDOM_LEN {
        getrandom::fill(&mut buf)?;
        base62_into(&mut random, &mut i, &buf);
    }
    let mut s = String::with_capacity(LEN);
    s.push_str(PREFIX);
    s.extend(random.iter().map(|&b| b as char));
    s.extend(checksum(&random).iter().map(|&b| b as char));
    Ok(s)
}

/// `tokens.yaml` as written by operators.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatFileSpec {
    #[serde(default)]
    pub tokens: Vec<PatRecordSpec>,
}

/// One record of `tokens.yaml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatRecordSpec {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cube: Option<CubeSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cubes: Option<Vec<CubeSpec>>,
}

/// A compiled record.
#[derive(Debug, Clone)]
pub struct PatRecord {
    pub id: Box<str>,
    /// Unix seconds; `None` never expires.
    pub expires: Option<i64>,
    pub disabled: bool,
    pub cubes: Box<[Cube]>,
}

/// Parse an RFC 3339 timestamp into Unix seconds.
pub fn parse_rfc3339(s: &str) -> Result<i64, String> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|e| format!("`{s}` is not an RFC 3339 timestamp ({e})"))
}

/// Parse a 64-character hex SHA-256.
fn parse_sha256(s: &str) -> Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return Err(format!("sha256 must be 64 hex characters, got {}", s.len()));
    }
    hex::decode_to_slice(s, &mut out).map_err(|_| "sha256 is not hex".to_string())?;
    Ok(out)
}

impl PatRecordSpec {
    /// Compile against a snapshot. Errors are `(key, message)` with the key
    /// relative to the record.
    pub fn compile(&self, v: &Vocabulary<'_>) -> Result<([u8; 32], PatRecord), (String, String)> {
        if !is_safe_identity(&self.id) {
            return Err(("id".into(), "must be 1-256 visible ASCII characters".into()));
        }
        let hash = parse_sha256(&self.sha256).map_err(|m| ("sha256".to_string(), m))?;
        let expires = match &self.expires {
            Some(s) => Some(parse_rfc3339(s).map_err(|m| ("expires".to_string(), m))?),
            None => None,
        };
        let specs =
            cube_list(&self.cube, &self.cubes).map_err(|m| ("cube".to_string(), m.to_string()))?;
        let mut cubes = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let key = if self.cube.is_some() {
                "cube".to_string()
            } else {
                format!("cubes[{i}]")
            };
            cubes.push(spec.compile(v, Strictness::Config).map_err(|m| (key, m))?);
        }
        Ok((
            hash,
            PatRecord {
                id: self.id.as_str().into(),
                expires,
                disabled: self.disabled,
                cubes: cubes.into_boxed_slice(),
            },
        ))
    }
}

/// Records by the SHA-256 of their token.
#[derive(Debug, Default, Clone)]
pub struct PatStore {
    by_hash: HashMap<TokenDigest, PatRecord, BuildHasherDefault<DigestHasher>>,
}

/// A SHA-256 digest as a table key. A digest is already uniformly spread,
/// so its first eight bytes are its hash: SipHash over all 32 cost about 270
/// instructions a request (callgrind) for nothing. Flooding is no concern:
/// lookups cannot add entries, and the stored keys are digests of the
/// operator's random secrets, so a chosen token can only probe as far as
/// those keys' own clusters reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TokenDigest([u8; 32]);

impl Hash for TokenDigest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let [a, b, c, d, e, f, g, h, ..] = self.0;
        state.write_u64(u64::from_le_bytes([a, b, c, d, e, f, g, h]));
    }
}

/// The hasher for [`TokenDigest`]: the one `u64` it is given.
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    // Only `write_u64` is reached from `TokenDigest`; anything else still
    // mixes every byte in rather than being dropped.
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
}

impl PatStore {
    pub fn with_capacity(n: usize) -> PatStore {
        PatStore {
            by_hash: HashMap::with_capacity_and_hasher(n, BuildHasherDefault::default()),
        }
    }

    pub fn insert(&mut self, hash: [u8; 32], record: PatRecord) -> bool {
        match self.by_hash.entry(TokenDigest(hash)) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(record);
                true
            }
        }
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// The record with this id. A scan: for admin and CLI use, never on the
    /// request path.
    pub fn find_by_id(&self, id: &str) -> Option<&PatRecord> {
        self.by_hash.values().find(|r| &*r.id == id)
    }

    /// Authenticate a PAT: shape and checksum, lookup by hash, expiry,
    /// revocation — in that order (SPEC §6).
    pub fn authenticate(&self, token: &str, now: i64) -> Result<Principal<'_>, AuthError> {
        if !well_formed(token) {
            return Err(AuthError::Malformed);
        }
        let record = self
            .by_hash
            .get(&TokenDigest(hash(token)))
            .ok_or(AuthError::UnknownToken)?;
        if record.expires.is_some_and(|exp| now >= exp) {
            return Err(AuthError::Expired);
        }
        if record.disabled {
            return Err(AuthError::Revoked);
        }
        Ok(Principal::Pat(record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_are_well_formed_and_distinct() {
        let a = mint().expect("random");
        let b = mint().expect("random");
        assert_eq!(a.len(), 44);
        assert!(well_formed(&a) && well_formed(&b));
        assert_ne!(a, b);
    }

    #[test]
    fn checksum_matches_zlib_crc32_in_base62() {
        // Vectors computed independently with Python's zlib.crc32 and a
        // base-62 encoder over 0-9A-Za-z.
        assert_eq!(&checksum(b"123456789"), b"3jZRME");
        assert!(well_formed("abx_pat_Q7mN2pXv9LcT4hR8sK1wZ5yB3dF6gJ1T5tiQ"));
        assert!(!well_formed("abx_pat_Q7mN2pXv9LcT4hR8sK1wZ5yB3dF6gJ1T5tiR"));
    }

    #[test]
    fn digests_sharing_their_hash_bytes_stay_apart() {
        // Same first eight bytes, so the same hash: equality still decides.
        let record = |id: &str| PatRecord {
            id: id.into(),
            expires: None,
            disabled: false,
            cubes: Box::new([]),
        };
        let mut store = PatStore::with_capacity(2);
        let (a, mut b) = (hash("abx_pat_a"), hash("abx_pat_a"));
        b[31] ^= 1;
        assert!(store.insert(a, record("a")));
        assert!(store.insert(b, record("b")));
        assert!(!store.insert(a, record("again")));
        assert_eq!(store.len(), 2);
        assert_eq!(
            store.by_hash.get(&TokenDigest(a)).map(|r| &*r.id),
            Some("a")
        );
        assert_eq!(
            store.by_hash.get(&TokenDigest(b)).map(|r| &*r.id),
            Some("b")
        );
    }

    #[test]
    fn shape_and_checksum_are_enforced() {
        let t = mint().expect("random");
        assert!(well_formed(&t));
        // Flip one random character: checksum no longer matches.
        let mut bad = t.clone().into_bytes();
        bad[10] = if bad[10] == b'a' { b'b' } else { b'a' };
        assert!(!well_formed(std::str::from_utf8(&bad).expect("ascii")));
        assert!(!well_formed(&t[..43]));
        assert!(!well_formed(&format!("{t}x")));
        assert!(!well_formed(&t.replacen("abx_pat_", "abx_pot_", 1)));
        let mut non_alnum = t.into_bytes();
        non_alnum[12] = b'-';
        assert!(!well_formed(
            std::str::from_utf8(&non_alnum).expect("ascii")
        ));
        assert!(!well_formed("abx_pat_é"));
    }

    #[test]
    fn minting_maps_bytes_to_base62_without_bias() {
        // Every byte value once: the 248 below the bound are taken, each
        // character from exactly four of them; 248 to 255 are skipped.
        let all: Vec<u8> = (0..=255).collect();
        let mut out = [0u8; 300];
        let mut i = 0;
        base62_into(&mut out, &mut i, &all);
        assert_eq!(i, 248);
        for c in BASE62 {
            assert_eq!(
                out[..i].iter().filter(|&&o| o == *c).count(),
                4,
                "{}",
                *c as char
            );
        }
        assert_eq!(&out[..3], b"012");
        assert_eq!(out[61], b'z');
        assert_eq!(out[62], b'0');
        // Stops when full, and goes on where it stopped.
        let mut out = [0u8; 5];
        let mut i = 3;
        base62_into(&mut out, &mut i, &[255, 61, 248, 62, 1]);
        assert_eq!((i, &out[3..]), (5, &b"z0"[..]));
    }

    #[test]
    fn a_store_keys_on_the_digests_first_eight_bytes() {
        use std::hash::BuildHasher;
        let build = BuildHasherDefault::<DigestHasher>::default();
        let mut d = [0u8; 32];
        d[..8].copy_from_slice(&0x0123_4567_89ab_cdefu64.to_le_bytes());
        d[8..].fill(0xee);
        assert_eq!(build.hash_one(TokenDigest(d)), 0x0123_4567_89ab_cdef);
        // Any other input: every byte counts, however long it is.
        let hash = |bytes: &[u8]| {
            let mut h = build.build_hasher();
            h.write(bytes);
            h.finish()
        };
        let ones = [0xffu8; 16];
        for p in 0..16 {
            let mut v = ones;
            v[p] = 0;
            assert_ne!(hash(&v), hash(&ones), "byte {p}");
        }
        let mut store = PatStore::with_capacity(1);
        assert!(store.is_empty());
        let record = PatRecord {
            id: "p".into(),
            expires: None,
            disabled: false,
            cubes: Box::new([]),
        };
        assert!(store.insert(d, record));
        assert!(!store.is_empty());
    }
}
