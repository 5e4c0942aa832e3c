//! XMPP URIs for invites (XEP-0401 / XEP-0379 / RFC 5122).

/// `xmpp:JID?ACTION;preauth=TOKEN[;PARAMS]`, with the JID escaped as RFC 5122 asks.
pub fn invite_uri(action: &str, jid: &str, token: &str, params: Option<&str>) -> String {
    let mut uri = String::with_capacity(jid.len() + token.len() + 32);
    uri.push_str("xmpp:");
    push_escaped(&mut uri, jid, b"-._~!$&'()*+,=@");
    uri.push('?');
    uri.push_str(action);
    uri.push_str(";preauth=");
    // Ours are base64url and pass as they are; a token imported from Prosody's store may
    // hold anything, and must not end the parameter early (`;`, `#`, …).
    push_escaped(&mut uri, token, TOKEN_KEEP);
    if let Some(p) = params {
        uri.push(';');
        uri.push_str(p);
    }
    uri
}

/// A token as it stands in a URL: ours (base64url) unchanged, anything else escaped.
pub fn escape_token(token: &str) -> String {
    let mut out = String::with_capacity(token.len());
    push_escaped(&mut out, token, TOKEN_KEEP);
    out
}

const TOKEN_KEEP: &[u8] = b"-._~";

/// Appends `text`, percent-escaping every byte but ASCII letters, digits and `keep`.
fn push_escaped(uri: &mut String, text: &str, keep: &[u8]) {
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || keep.contains(&b) {
            uri.push(char::from(b));
        } else {
            uri.push_str(&format!("%{b:02X}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_the_uris_of_protocol_md_and_escapes_what_rfc5122_does_not_allow() {
        for (action, jid, token, params, uri) in [
            (
                "register",
                "example.com",
                "T",
                None,
                "xmpp:example.com?register;preauth=T",
            ),
            (
                "register",
                "juliet@example.com",
                "T",
                None,
                "xmpp:juliet@example.com?register;preauth=T",
            ),
            (
                "roster",
                "romeo@example.com",
                "T",
                Some("ibr=y"),
                "xmpp:romeo@example.com?roster;preauth=T;ibr=y",
            ),
            (
                "register",
                "a b/c?d@x.y",
                "T",
                None,
                "xmpp:a%20b%2Fc%3Fd@x.y?register;preauth=T",
            ),
            (
                "register",
                "j\u{fc}@x",
                "T",
                None,
                "xmpp:j%C3%BC@x?register;preauth=T",
            ),
            // A token imported from Prosody's store may hold anything; ours pass unchanged.
            (
                "register",
                "x",
                "ab+/=;c d",
                None,
                "xmpp:x?register;preauth=ab%2B%2F%3D%3Bc%20d",
            ),
            (
                "register",
                "x",
                "Az09-_",
                None,
                "xmpp:x?register;preauth=Az09-_",
            ),
        ] {
            assert_eq!(invite_uri(action, jid, token, params), uri);
        }
    }
}
