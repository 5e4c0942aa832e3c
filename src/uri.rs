//! XMPP URIs for invites (XEP-0401 / XEP-0379 / RFC 5122).

/// `xmpp:JID?ACTION;preauth=TOKEN[;PARAMS]`, with the JID escaped as RFC 5122 asks.
pub fn invite_uri(action: &str, jid: &str, token: &str, params: Option<&str>) -> String {
    let mut uri = String::with_capacity(jid.len() + token.len() + 32);
    uri.push_str("xmpp:");
    for b in jid.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,=@".contains(&b) {
            uri.push(char::from(b));
        } else {
            uri.push_str(&format!("%{b:02X}"));
        }
    }
    uri.push('?');
    uri.push_str(action);
    uri.push_str(";preauth=");
    uri.push_str(token);
    if let Some(p) = params {
        uri.push(';');
        uri.push_str(p);
    }
    uri
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_the_uris_of_protocol_md() {
        assert_eq!(
            invite_uri("register", "example.com", "T", None),
            "xmpp:example.com?register;preauth=T"
        );
        assert_eq!(
            invite_uri("register", "juliet@example.com", "T", None),
            "xmpp:juliet@example.com?register;preauth=T"
        );
        assert_eq!(
            invite_uri("roster", "romeo@example.com", "T", Some("ibr=y")),
            "xmpp:romeo@example.com?roster;preauth=T;ibr=y"
        );
    }

    #[test]
    fn escapes_what_rfc5122_does_not_allow() {
        assert_eq!(
            invite_uri("register", "a b/c?d@x.y", "T", None),
            "xmpp:a%20b%2Fc%3Fd@x.y?register;preauth=T"
        );
        assert_eq!(
            invite_uri("register", "j\u{fc}@x", "T", None),
            "xmpp:j%C3%BC@x?register;preauth=T"
        );
    }
}
