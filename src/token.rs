//! Invite tokens and their hashes.
//!
//! A [`Token`] is the secret handed to the invitee. It is shown once, inside the URI
//! given to the inviter, and otherwise only ever compared through its [`TokenHash`]:
//! storage keys, records and logs see the hash (or a short suffix of it), never the token.

use std::fmt;

use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::error::InviteError;

/// Random bytes in a new token: 144 bits, 24 characters of base64url.
const TOKEN_BYTES: usize = 18;
/// Longest token accepted from the outside, in bytes. Ours are 24 characters and Prosody's
/// own 16, but Prosody's store takes any string, so imported tokens may be anything
/// up to this length.
pub const MAX_TOKEN_LEN: usize = 1024;
/// Hex digits of the hash shown as an invite's public id.
const SHORT_ID_LEN: usize = 10;
/// Prefix naming the hash function in stored records.
pub const HASH_TAG: &str = "sha256:";

const BASE64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// The secret part of an invite. `Debug` and `Display` never show it, and it is not `Serialize`.
pub struct Token(String);

impl Token {
    /// A fresh token from the operating system's CSPRNG (through rand's thread RNG).
    pub fn generate() -> Token {
        let mut bytes = [0u8; TOKEN_BYTES];
        rand::rng().fill_bytes(&mut bytes);
        let token = Token(base64url(&bytes));
        bytes.fill(0);
        token
    }

    /// Accepts a token from a client, a URL or an admin. Ours are base64url, but an invite
    /// imported from Prosody's own store may have any string as its token, so any text is
    /// looked up by its hash; only what cannot be a token at all (empty, longer than
    /// `MAX_TOKEN_LEN`) is refused without a lookup.
    pub fn parse(candidate: &str) -> Result<Token, InviteError> {
        if candidate.is_empty() {
            return Err(InviteError::NoToken);
        }
        if candidate.len() > MAX_TOKEN_LEN {
            return Err(InviteError::TokenInvalid);
        }
        Ok(Token(candidate.to_owned()))
    }

    /// The secret itself, for building the one URI that carries it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> TokenHash {
        let digest = Sha256::digest(self.0.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(&digest);
        TokenHash(out)
    }
}

impl Drop for Token {
    fn drop(&mut self) {
        // SAFETY: zero bytes are valid UTF-8, so the String stays well-formed.
        unsafe { self.0.as_bytes_mut().fill(0) };
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token([REDACTED])")
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

/// SHA-256 of a token: what storage is keyed by.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    /// Parses the 64 lowercase hex digits used as a storage key.
    pub fn from_key(key: &str) -> Option<TokenHash> {
        if !key
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return None;
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(key, &mut out).ok()?;
        Some(TokenHash(out))
    }

    /// The storage key: 64 lowercase hex digits.
    pub fn key(&self) -> String {
        hex::encode(self.0)
    }

    /// The form kept inside a record: `sha256:` and the key.
    pub fn tagged(&self) -> String {
        format!("{HASH_TAG}{}", self.key())
    }

    /// A short, non-secret name for logs and listings: the last hex digits of the hash.
    pub fn short_id(&self) -> String {
        short_id_of_key(&self.key())
    }

    /// Compares without an early exit, so timing does not tell how much of a hash matched.
    pub fn ct_eq(&self, other: &TokenHash) -> bool {
        let mut diff = 0u8;
        for (a, b) in self.0.iter().zip(other.0.iter()) {
            diff |= a ^ b;
        }
        diff == 0
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({})", self.short_id())
    }
}

/// The short id of a storage key (see [`TokenHash::short_id`]).
pub fn short_id_of_key(key: &str) -> String {
    let start = key.len().saturating_sub(SHORT_ID_LEN);
    key.get(start..).unwrap_or(key).to_owned()
}

fn base64url(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            let idx = (n >> (18 - 6 * i)) & 0x3f;
            out.push(char::from(BASE64URL[idx as usize]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn generated_tokens_are_url_safe_unique_and_parse_back() {
        let mut seen = HashSet::new();
        for _ in 0..1000 {
            let t = Token::generate();
            assert_eq!(t.expose().len(), 24);
            assert!(Token::parse(t.expose()).is_ok());
            assert!(seen.insert(t.expose().to_owned()));
        }
    }

    #[test]
    fn parse_rejects_only_what_cannot_be_a_token() {
        assert_eq!(Token::parse("").err(), Some(InviteError::NoToken));
        assert_eq!(
            Token::parse(&"a".repeat(MAX_TOKEN_LEN + 1)).err(),
            Some(InviteError::TokenInvalid)
        );
        // Prosody's own util.id.medium tokens (16 chars of base64url) stay valid, and so do
        // tokens of any shape its store accepted (imported; looked up by hash).
        for good in [
            "Ab-_09xyzXYZ12-_",
            "a b",
            "tok/en+=",
            "t\u{e9}",
            "t\0",
            &"a".repeat(MAX_TOKEN_LEN),
        ] {
            assert!(Token::parse(good).is_ok(), "{good:?}");
        }
        assert_ne!(
            Token::parse("tok+en").unwrap().hash(),
            Token::parse("tok-en").unwrap().hash()
        );
    }

    #[test]
    fn debug_and_display_redact() {
        let t = Token::parse("supersecrettoken").unwrap();
        assert!(!format!("{t:?}").contains("supersecret"));
        assert!(!format!("{t}").contains("supersecret"));
        assert!(!format!("{:?}", t.hash()).contains("supersecret"));
    }

    #[test]
    fn hash_matches_sha256_and_round_trips_through_key() {
        let h = Token::parse("abc").unwrap().hash();
        assert_eq!(
            h.key(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(h.tagged(), format!("sha256:{}", h.key()));
        assert_eq!(h.short_id(), "61f20015ad");
        assert_eq!(TokenHash::from_key(&h.key()), Some(h));
        assert!(TokenHash::from_key("zz").is_none());
        assert!(TokenHash::from_key(&"G".repeat(64)).is_none());
        assert!(h.ct_eq(&h));
        assert!(!h.ct_eq(&Token::parse("abd").unwrap().hash()));
    }

    #[test]
    fn base64url_matches_rfc4648_vectors() {
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b"fo"), "Zm8");
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(b"foob"), "Zm9vYg");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }
}
