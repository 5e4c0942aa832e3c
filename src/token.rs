//! Invite tokens and their hashes.
//!
//! A [`Token`] is the secret handed to the invitee. It is shown once, inside the URI
//! given to the inviter, and otherwise only ever compared through its [`TokenHash`]:
//! storage keys, records and logs see the hash (or a short suffix of it), never the token.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

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

/// The secret part of an invite. `Debug` and `Display` never show it, it is not
/// `Serialize`, and its bytes are wiped when it is dropped.
pub struct Token(Zeroizing<String>);

impl Token {
    /// A fresh token from the operating system's CSPRNG (through rand's thread RNG).
    pub fn generate() -> Token {
        let mut bytes = Zeroizing::new([0u8; TOKEN_BYTES]);
        rand::rng().fill_bytes(bytes.as_mut());
        Token(Zeroizing::new(URL_SAFE_NO_PAD.encode(bytes.as_ref())))
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
        Ok(Token(Zeroizing::new(candidate.to_owned())))
    }

    /// The secret itself, for building the one URI that carries it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> TokenHash {
        TokenHash(Sha256::digest(self.0.as_bytes()).into())
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

/// SHA-256 of a token: what stands for the token everywhere but the one URI. Storage is
/// keyed by its hex form ([`TokenHash::key`]). Equality is constant-time (`subtle`), so
/// timing never tells how much of a hash matched.
#[derive(Clone, Copy)]
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
        hex::encode(&self.0[self.0.len() - SHORT_ID_LEN / 2..])
    }
}

impl ConstantTimeEq for TokenHash {
    fn ct_eq(&self, other: &TokenHash) -> subtle::Choice {
        self.0.ct_eq(&other.0)
    }
}

impl PartialEq for TokenHash {
    fn eq(&self, other: &TokenHash) -> bool {
        self.ct_eq(other).into()
    }
}

impl Eq for TokenHash {}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({})", self.short_id())
    }
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
        assert!(bool::from(h.ct_eq(&h)));
        assert!(!bool::from(h.ct_eq(&Token::parse("abd").unwrap().hash())));
        assert_ne!(h, Token::parse("abd").unwrap().hash());
    }

    #[test]
    fn generated_tokens_are_base64url_of_144_random_bits() {
        let t = Token::generate();
        let bytes = URL_SAFE_NO_PAD.decode(t.expose()).unwrap();
        assert_eq!(bytes.len(), TOKEN_BYTES);
        assert!(t
            .expose()
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    }
}
