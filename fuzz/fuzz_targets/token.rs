//! Token text from anywhere (preauth, URLs, admin commands), storage keys, and the URIs
//! built around a token.
//!
//! Checks, besides "never panics": `Token::parse` accepts exactly 1 to `MAX_TOKEN_LEN` bytes
//! of any text and keeps them as given; a token's `Debug`/`Display` are the fixed redacted
//! strings; a hash survives `key` → `from_key` and equals (in constant time) the hash of the
//! same text; `from_key` accepts exactly 64 lowercase hex digits; an invite URI carries the
//! token once, after `;preauth=`, and its JID part percent-decodes back to the JID.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prosody_invites::error::InviteError;
use prosody_invites::token::{Token, TokenHash, HASH_TAG, MAX_TOKEN_LEN};
use prosody_invites::uri::invite_uri;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    check_parse(&text);
    check_key(&text);
    // The same bytes as the pieces of a URI: JID, then the token, split at the first NUL.
    let (jid, token) = text.split_once('\0').unwrap_or((&text, "tok"));
    check_uri(jid, token);
});

/// Any text of 1 to MAX_TOKEN_LEN bytes can be a token (Prosody's store took any string).
fn is_token_text(s: &str) -> bool {
    (1..=MAX_TOKEN_LEN).contains(&s.len())
}

fn check_parse(text: &str) {
    match Token::parse(text) {
        Ok(token) => {
            assert!(is_token_text(text), "accepted {text:?}");
            assert_eq!(token.expose(), text);
            assert_eq!(format!("{token:?}"), "Token([REDACTED])");
            assert_eq!(format!("{token}"), "[REDACTED]");
            assert_eq!(format!("{token:#?}"), "Token([REDACTED])");

            let hash = token.hash();
            let key = hash.key();
            assert_eq!(key.len(), 64);
            assert_eq!(TokenHash::from_key(&key), Some(hash));
            assert_eq!(hash, Token::parse(text).expect("parsed once").hash());
            assert_eq!(hash.tagged(), format!("{HASH_TAG}{key}"));
            assert!(key.ends_with(&hash.short_id()));
            assert_eq!(hash.short_id().len(), 10);
            assert_eq!(
                format!("{hash:?}"),
                format!("TokenHash({})", hash.short_id())
            );
        }
        Err(InviteError::NoToken) => assert!(text.is_empty()),
        Err(InviteError::TokenInvalid) => assert!(!is_token_text(text), "refused {text:?}"),
        Err(other) => panic!("unexpected parse error {other:?}"),
    }
}

fn check_key(text: &str) {
    let is_key = text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    match TokenHash::from_key(text) {
        Some(hash) => {
            assert!(is_key, "accepted key {text:?}");
            assert_eq!(hash.key(), text);
            assert!(text.ends_with(&hash.short_id()));
        }
        None => assert!(!is_key, "refused key {text:?}"),
    }
}

fn check_uri(jid: &str, token: &str) {
    let Ok(token) = Token::parse(token) else {
        return;
    };
    for (action, params) in [("register", None), ("roster", Some("ibr=y"))] {
        let uri = invite_uri(action, jid, token.expose(), params);
        let rest = uri.strip_prefix("xmpp:").expect("scheme");
        let (escaped_jid, query) = rest.split_once('?').expect("a query after the JID");
        assert_eq!(percent_decode(escaped_jid), jid.as_bytes());
        // The token comes back whole, escaped so that nothing in it ends the parameter.
        let tail = query
            .strip_prefix(&format!("{action};preauth="))
            .expect("the preauth parameter");
        let escaped_token = match params {
            Some(p) => tail
                .strip_suffix(&format!(";{p}"))
                .expect("the parameters after the token"),
            None => tail,
        };
        assert!(!escaped_token.contains([';', '#', '&', '?', '=', ' ']));
        assert_eq!(percent_decode(escaped_token), token.expose().as_bytes());
    }
}

/// RFC 3986 percent-decoding, written for this check (the crate only encodes).
fn percent_decode(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).expect("two hex digits after %");
            out.push(u8::from_str_radix(hex, 16).expect("hex digits after %"));
            i += 3;
        } else {
            assert!(
                bytes[i].is_ascii_graphic() && !b"/?#%:;[]".contains(&bytes[i]),
                "unescaped {:?} in a URI's JID",
                char::from(bytes[i])
            );
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}
