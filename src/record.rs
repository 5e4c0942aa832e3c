//! The stored form of one invite: storage layout and encoding.
//!
//! Layout (all through Prosody's keyval store API, so internal files, SQLite and
//! PostgreSQL behave alike):
//! - store `invites`: owner = the 64-hex SHA-256 of the token, value = `{ record = JSON }`;
//!   one record per invite, so no operation touches other invites.
//! - store `invites_by_username`: owner = a username an invite is bound to,
//!   value = `{ record = JSON }` listing the keys of invites that reserve that name.
//! - store `invite_accounts`: owner = a local username, value = `{ record = JSON }`: the
//!   account's entry in the invite tree (who invited it, whom it invited) and the creation
//!   times of its invites, for quotas.
//!
//! The token is never part of any. Records carry a version so later layouts can migrate;
//! fields added since are optional, and left out of the JSON while empty, so records
//! written before and after they were added read alike.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::token::{Token, TokenHash, HASH_TAG};
use crate::uri::escape_token;

pub const RECORD_VERSION: u32 = 1;

/// Longest `source` an invite keeps, in bytes.
pub const MAX_SOURCE_LEN: usize = 256;
/// Longest `note` an invite keeps, in bytes.
pub const MAX_NOTE_LEN: usize = 1024;
/// Redemptions an invite keeps, the newest: an invite for any number of accounts would
/// otherwise grow with each. The account tree keeps every account's invite all the same.
pub const MAX_REDEMPTIONS: usize = 1000;

/// What the invite grants: an account (`register`) or a contact (`roster`), as Prosody names them.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InviteKind {
    Register,
    Roster,
}

impl InviteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            InviteKind::Register => "register",
            InviteKind::Roster => "roster",
        }
    }
}

/// Stored lifecycle state. `expired` and `reserved` are derived from time and reservations.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoredState {
    Pending,
    Used,
    Revoked,
}

/// A registration in flight holding one use of the invite until it completes or is released.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    pub holder: String,
    pub until: i64,
    /// The account being created (not for resets): if it exists once the reservation has
    /// lapsed, the server stopped between creating it and confirming, and the use is spent.
    #[serde(default)]
    pub username: Option<String>,
    /// When it was made (records of earlier versions: unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<i64>,
}

/// One use of an invite, redeemed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Redemption {
    /// The account created, or whose password was reset; for a use the caller named nobody
    /// for (another module's `use()`), none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    pub at: i64,
    /// A password reset, not a new account.
    #[serde(default, skip_serializing_if = "is_false")]
    pub reset: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// An invite as stored (JSON, under the key of its token's hash). A field at its default
/// (none, false, zero, empty) is left out and read back as that default, by this version
/// and by earlier ones: every registration reads and writes the record, and on Prosody's
/// storage each byte of it is parsed, escaped and collected again.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct InviteRecord {
    pub v: u32,
    /// `sha256:` + hex of the token; must match the key the record is stored under.
    pub hash: String,
    #[serde(rename = "type")]
    pub kind: InviteKind,
    pub jid: String,
    pub allow_registration: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub additional_data: Option<serde_json::Value>,
    pub created_at: i64,
    pub expires: i64,
    #[serde(default, skip_serializing_if = "is_false")]
    pub reusable: bool,
    /// Accounts this invite may create; `None` with `reusable` means any number until expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_uses: Option<u32>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub uses: u32,
    pub state: StoredState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reservations: Vec<Reservation>,
    /// The only username this invite may register (account invites naming a user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Password-reset invites: the existing account whose password may be reset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset: Option<String>,
    /// Roster invites: the local user whose contact the invitee becomes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inviter: Option<String>,
    /// The token, sealed (see `seal.rs`), where `invite_token_storage = "sealed"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_token: Option<String>,
    /// The landing page `invite-created` handlers gave the invite, without its token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub landing_page: Option<LandingPage>,
    /// The local account (a username) on whose behalf the invite was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creator: Option<String>,
    /// Where it was made, as free text: `prosodyctl`, `shell`, an admin's JID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// An administrator's note.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The uses redeemed, oldest first (at most `MAX_REDEMPTIONS`, the newest).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redemptions: Vec<Redemption>,
}

/// A landing page URL kept without its token: the text around each place the token stood,
/// to be joined with the token again when it is known.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct LandingPage {
    pub parts: Vec<String>,
    /// The token stood there percent-escaped (a token that is not base64url, in a URL).
    #[serde(default)]
    pub escaped: bool,
}

impl LandingPage {
    pub fn without_token(url: &str, token: &Token) -> LandingPage {
        let raw = token.expose();
        let escaped = escape_token(raw);
        let (needle, escaped) = if url.contains(raw) || escaped == raw {
            (raw, false)
        } else {
            (escaped.as_str(), true)
        };
        LandingPage {
            parts: url.split(needle).map(str::to_owned).collect(),
            escaped,
        }
    }

    pub fn with_token(&self, token: &Token) -> String {
        if self.escaped {
            self.parts.join(&escape_token(token.expose()))
        } else {
            self.parts.join(token.expose())
        }
    }
}

/// Why a stored value could not be read as a record. Holds no secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl InviteRecord {
    pub fn encode(&self) -> String {
        // Serialising plain data with string keys cannot fail; fall back to an
        // undecodable marker rather than panic if it ever does.
        serde_json::to_string(self).unwrap_or_else(|_| String::from("!"))
    }

    /// Decodes and checks a stored record. `hash` is the one it was looked up by.
    pub fn decode(text: &str, hash: &TokenHash) -> Result<InviteRecord, DecodeError> {
        let record: InviteRecord = serde_json::from_str(text)
            .map_err(|e| DecodeError(format!("not a valid record: {e}")))?;
        if record.v != RECORD_VERSION {
            return Err(DecodeError(format!("unknown record version {}", record.v)));
        }
        let stored_hash = record
            .hash
            .strip_prefix(HASH_TAG)
            .and_then(TokenHash::from_key)
            .ok_or_else(|| DecodeError(String::from("hash field is not sha256 hex")))?;
        if stored_hash != *hash {
            return Err(DecodeError(String::from("record stored under another key")));
        }
        if record.jid.is_empty() {
            return Err(DecodeError(String::from("empty jid")));
        }
        if record.max_uses == Some(0) {
            return Err(DecodeError(String::from("max_uses is zero")));
        }
        Ok(record)
    }

    /// The virtual host the invite was made on: the domain of its JID.
    pub fn host(&self) -> &str {
        self.jid
            .rsplit_once('@')
            .map_or(self.jid.as_str(), |(_, domain)| domain)
    }

    /// The local account an account made with this invite was invited by: its creator, or
    /// for a contact invite made before invites had creators, the user it is a contact of.
    pub fn invited_by(&self) -> Option<&str> {
        self.creator.as_deref().or(match self.kind {
            InviteKind::Roster => self.inviter.as_deref(),
            InviteKind::Register => None,
        })
    }

    /// Whether the invite is `username`'s: made by them, or a contact invite to them.
    pub fn is_from(&self, username: &str) -> bool {
        self.creator.as_deref() == Some(username)
            || (self.kind == InviteKind::Roster && self.inviter.as_deref() == Some(username))
    }

    /// Uses this invite allows in total; `None` = unlimited until expiry.
    pub fn use_limit(&self) -> Option<u32> {
        match (self.max_uses, self.reusable) {
            (Some(n), _) => Some(n),
            (None, true) => None,
            (None, false) => Some(1),
        }
    }
}

/// The per-username index: which invites reserve a name, and until when.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct NameIndex {
    pub v: u32,
    /// storage key → expiry of that invite
    pub invites: BTreeMap<String, i64>,
}

impl NameIndex {
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| String::from("!"))
    }

    pub fn decode(text: &str) -> Result<NameIndex, DecodeError> {
        let index: NameIndex = serde_json::from_str(text)
            .map_err(|e| DecodeError(format!("not a valid username index: {e}")))?;
        if index.v != RECORD_VERSION {
            return Err(DecodeError(format!("unknown index version {}", index.v)));
        }
        Ok(index)
    }
}

/// Where an account's entry is kept: not under the bare username, because Prosody purges
/// every record kept under a deleted account's username (after `user-deleted`), and the
/// entry outlives the account so that the tree keeps its place.
const ENTRY_KEY_PREFIX: &str = "account:";

/// The store key of `username`'s entry in the invite tree.
pub fn entry_key(username: &str) -> String {
    format!("{ENTRY_KEY_PREFIX}{username}")
}

/// The username an entry's store key names, if it is one.
pub fn username_of_entry_key(key: &str) -> Option<&str> {
    key.strip_prefix(ENTRY_KEY_PREFIX).filter(|u| !u.is_empty())
}

/// A local account's entry in the invite tree, kept under [`entry_key`] of its username.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct AccountEntry {
    pub v: u32,
    /// The account that invited it (the creator of its invite).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// Where its invite was made (the invite's `source`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The id of the invite it registered with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invite: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registered: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted: Option<i64>,
    /// The accounts registered with its invites, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub invited: Vec<String>,
    /// When it made its recent invites, for quotas (see `quota.rs`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub created: Vec<i64>,
}

impl AccountEntry {
    pub fn new() -> AccountEntry {
        AccountEntry {
            v: RECORD_VERSION,
            ..AccountEntry::default()
        }
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| String::from("!"))
    }

    pub fn decode(text: &str) -> Result<AccountEntry, DecodeError> {
        let entry: AccountEntry = serde_json::from_str(text)
            .map_err(|e| DecodeError(format!("not a valid account entry: {e}")))?;
        if entry.v != RECORD_VERSION {
            return Err(DecodeError(format!(
                "unknown account entry version {}",
                entry.v
            )));
        }
        Ok(entry)
    }

    /// Notes that `child` registered with one of this account's invites (once).
    pub fn add_invited(&mut self, child: &str) -> bool {
        if self.invited.iter().any(|c| c == child) {
            return false;
        }
        self.invited.push(child.to_owned());
        true
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::token::Token;

    pub fn sample(token: &Token) -> InviteRecord {
        InviteRecord {
            v: RECORD_VERSION,
            hash: token.hash().tagged(),
            kind: InviteKind::Register,
            jid: String::from("example.com"),
            allow_registration: true,
            additional_data: Some(serde_json::json!({"roles": {"prosody:admin": true}})),
            created_at: 1000,
            expires: 2000,
            reusable: false,
            max_uses: None,
            uses: 0,
            state: StoredState::Pending,
            changed_at: None,
            reservations: vec![],
            username: None,
            reset: None,
            inviter: None,
            sealed_token: None,
            landing_page: None,
            creator: None,
            source: None,
            note: None,
            redemptions: Vec::new(),
        }
    }

    #[test]
    fn round_trips_and_never_contains_the_token() {
        let token = Token::parse("secrettokenvalue").unwrap();
        let record = sample(&token);
        let text = record.encode();
        assert!(!text.contains("secrettokenvalue"));
        assert_eq!(InviteRecord::decode(&text, &token.hash()).unwrap(), record);
    }

    #[test]
    fn rejects_corrupt_or_misplaced_records() {
        let token = Token::parse("secrettokenvalue").unwrap();
        let hash = token.hash();
        let other = Token::parse("othertoken").unwrap().hash();
        let good = sample(&token).encode();
        assert_eq!(
            InviteRecord::decode(&good, &other).err(),
            Some(DecodeError(String::from("record stored under another key")))
        );
        for bad in ["", "null", "[]", "{}", "{\"v\":1}", &good[..good.len() / 2]] {
            assert!(InviteRecord::decode(bad, &hash).is_err(), "{bad:?}");
        }
        let mut r = sample(&token);
        r.v = 2;
        assert!(InviteRecord::decode(&r.encode(), &hash).is_err());
        let mut r = sample(&token);
        r.hash = String::from("md5:abc");
        assert!(InviteRecord::decode(&r.encode(), &hash).is_err());
        let mut r = sample(&token);
        r.max_uses = Some(0);
        assert!(InviteRecord::decode(&r.encode(), &hash).is_err());
    }

    #[test]
    fn use_limit_follows_prosody_semantics() {
        let token = Token::parse("t").unwrap();
        let mut r = sample(&token);
        assert_eq!(r.use_limit(), Some(1));
        r.reusable = true;
        assert_eq!(r.use_limit(), None);
        r.max_uses = Some(5);
        assert_eq!(r.use_limit(), Some(5));
    }

    #[test]
    fn provenance_note_and_redemptions_round_trip_and_stay_out_while_empty() {
        let token = Token::parse("t").unwrap();
        let hash = token.hash();
        let plain = sample(&token).encode();
        for field in ["creator", "source", "note", "redemptions"] {
            assert!(!plain.contains(field), "{plain}");
        }
        let mut r = sample(&token);
        r.creator = Some(String::from("alice"));
        r.source = Some(String::from("admin@example.com/res"));
        r.note = Some(String::from("for the choir"));
        r.redemptions = vec![
            Redemption {
                account: Some(String::from("bob")),
                at: 1500,
                reset: false,
            },
            Redemption {
                account: None,
                at: 1600,
                reset: true,
            },
        ];
        let text = r.encode();
        assert!(text.contains(r#"{"account":"bob","at":1500}"#), "{text}");
        assert!(text.contains(r#"{"at":1600,"reset":true}"#), "{text}");
        assert_eq!(InviteRecord::decode(&text, &hash).unwrap(), r);
    }

    #[test]
    fn a_record_leaves_out_what_is_at_its_default_and_reads_as_before() {
        let token = Token::parse("t").unwrap();
        let mut r = sample(&token);
        r.additional_data = None;
        let text = r.encode();
        assert_eq!(
            text,
            format!(
                r#"{{"v":1,"hash":"{}","type":"register","jid":"example.com","allow_registration":true,"created_at":1000,"expires":2000,"state":"pending"}}"#,
                token.hash().tagged()
            )
        );
        // As earlier versions wrote it, every field named: the same invite. (Every field
        // left out has been read as its default since the first version, so those read
        // what this one writes.)
        let earlier = format!(
            r#"{{"v":1,"hash":"{}","type":"register","jid":"example.com",
            "allow_registration":true,"additional_data":null,"created_at":1000,
            "expires":2000,"reusable":false,"max_uses":null,"uses":0,"state":"pending",
            "changed_at":null,"reservations":[],"username":null,"reset":null,"inviter":null}}"#,
            token.hash().tagged()
        );
        assert_eq!(InviteRecord::decode(&earlier, &token.hash()).unwrap(), r);
        assert_eq!(InviteRecord::decode(&text, &token.hash()).unwrap(), r);
        // Anything not at its default is written, and reads back.
        r.reusable = true;
        r.max_uses = Some(3);
        r.uses = 2;
        r.changed_at = Some(1500);
        r.username = Some(String::from("alice"));
        r.reservations.push(Reservation {
            holder: String::from("h"),
            until: 1600,
            username: Some(String::from("alice")),
            at: Some(1540),
        });
        let text = r.encode();
        for field in [
            "reusable",
            "max_uses",
            "uses",
            "changed_at",
            "username",
            "reservations",
        ] {
            assert!(text.contains(&format!("\"{field}\":")), "{field} in {text}");
        }
        assert_eq!(InviteRecord::decode(&text, &token.hash()).unwrap(), r);
    }

    #[test]
    fn a_record_written_before_provenance_still_reads() {
        let token = Token::parse("t").unwrap();
        let old = format!(
            r#"{{"v":1,"hash":"{}","type":"register","jid":"example.com",
            "allow_registration":true,"additional_data":null,"created_at":1000,
            "expires":2000,"reusable":false,"max_uses":null,"uses":1,"state":"used",
            "changed_at":1500,"reservations":[],"username":null,"reset":null,"inviter":null}}"#,
            token.hash().tagged()
        );
        let r = InviteRecord::decode(&old, &token.hash()).unwrap();
        assert_eq!((r.creator, r.source, r.note), (None, None, None));
        assert!(r.redemptions.is_empty());
    }

    #[test]
    fn who_invited_and_whose_invite_it_is() {
        let token = Token::parse("t").unwrap();
        let mut r = sample(&token);
        assert_eq!(r.invited_by(), None);
        r.inviter = Some(String::from("romeo"));
        // An account invite's inviter field means nothing.
        assert_eq!(r.invited_by(), None);
        assert!(!r.is_from("romeo"));
        r.kind = InviteKind::Roster;
        assert_eq!(r.invited_by(), Some("romeo"));
        assert!(r.is_from("romeo"));
        r.creator = Some(String::from("admin"));
        assert_eq!(r.invited_by(), Some("admin"));
        assert!(r.is_from("admin") && r.is_from("romeo") && !r.is_from("juliet"));
    }

    #[test]
    fn account_entries_round_trip_and_refuse_other_versions() {
        let empty = AccountEntry::new();
        assert_eq!(empty.encode(), r#"{"v":1}"#);
        assert_eq!(AccountEntry::decode(r#"{"v":1}"#).unwrap(), empty);
        let mut e = AccountEntry::new();
        e.by = Some(String::from("alice"));
        e.invite = Some(String::from("0123456789"));
        e.registered = Some(1000);
        assert!(e.add_invited("bob"));
        assert!(!e.add_invited("bob"));
        e.created = vec![900, 950];
        assert_eq!(AccountEntry::decode(&e.encode()).unwrap(), e);
        assert!(AccountEntry::decode(r#"{"v":2}"#).is_err());
        assert!(AccountEntry::decode("[]").is_err());
    }

    #[test]
    fn name_index_round_trips() {
        let mut idx = NameIndex {
            v: RECORD_VERSION,
            ..Default::default()
        };
        idx.invites.insert(String::from("k"), 5);
        assert_eq!(NameIndex::decode(&idx.encode()).unwrap(), idx);
        assert!(NameIndex::decode("{\"v\":9,\"invites\":{}}").is_err());
        assert!(NameIndex::decode("garbage").is_err());
    }
}
