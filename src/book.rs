//! The book: the invites of one virtual host over its storage. Each operation is one
//! read-check-write sequence over one record, made atomic by the backend
//! (`Backend::update`): on SQL a compare-and-set, on files a lock, so it holds between
//! processes sharing the storage as it does within one.
//!
//! `Book` owns the storage layout (see `record.rs`) and applies the state machine
//! (see `state.rs`). It never reads more than the records an operation is about, and it
//! logs only short ids, never tokens. Inside, an invite is named by its [`TokenHash`];
//! the hex key is made only where a store is called.
//!
//! Every operation that lets an invite do something (validate, reserve, confirm, redeem)
//! is told which host it acts for, and refuses with `wrong-host` unless that is the book's
//! host and the invite's: Prosody routes an unauthenticated stream's stanzas to whichever
//! host they name, so a hook of one host can be handed an invite checked by another.
//!
//! The book also keeps the invite tree: when a use creates an account, the account's entry
//! says which invite and whose it was, and the creator's entry lists it among those it
//! invited. Those writes follow the invite's and are best effort (the use is spent either
//! way); a failure is logged. Quotas (`charge`) are one read-check-write of the entry.

use std::cell::{Cell, OnceCell, RefCell};
use std::collections::HashMap;
use std::path::PathBuf;

use serde_json::Value;

use crate::error::{InviteError, StoreError};
use crate::quota::{self, Refusal, Rule};
use crate::record::{
    entry_key, AccountEntry, InviteKind, InviteRecord, LandingPage, NameIndex, StoredState,
    RECORD_VERSION,
};
use crate::seal::{load_or_create_key, Sealer};
use crate::state::{Claim, Edit, Status};
use crate::store::{Backend, Level, Space, Write};
use crate::token::{Token, TokenHash};
use crate::uri::invite_uri;

/// What a caller asks for when creating an invite.
#[derive(Clone, Debug)]
pub struct NewInvite {
    pub kind: InviteKind,
    pub jid: String,
    pub allow_registration: bool,
    pub additional_data: Option<Value>,
    pub ttl: i64,
    pub reusable: bool,
    pub max_uses: Option<u32>,
    /// Account invites: the only username they may register.
    pub username: Option<String>,
    /// Reset invites: the account whose password may be reset.
    pub reset: Option<String>,
    /// Roster invites: the local user whose contact the invitee becomes.
    pub inviter: Option<String>,
}

/// Who made a new invite, where, and why (each optional).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Provenance {
    /// The local account (username) on whose behalf it is made.
    pub creator: Option<String>,
    /// Where it is made: `prosodyctl`, `shell`, an admin's JID (at most `MAX_SOURCE_LEN`).
    pub source: Option<String>,
    /// An administrator's note (at most `MAX_NOTE_LEN`).
    pub note: Option<String>,
}

/// Whether the key file's mode lets its group or others read it.
fn key_file_is_open_to_others(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0)
}

/// What became of a use held by a registration that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Released {
    /// The holder held nothing (already released, confirmed, or lapsed).
    Nothing,
    /// The use is free again.
    GivenBack,
    /// The account was created after all: the use is redeemed.
    Spent,
}

impl Released {
    pub fn as_str(self) -> &'static str {
        match self {
            Released::Nothing => "nothing",
            Released::GivenBack => "given-back",
            Released::Spent => "spent",
        }
    }
}

/// How tokens are kept at rest (`invite_token_storage`).
#[derive(Debug)]
pub enum TokenStorage {
    /// Only the hash: no link can be shown again.
    Hash,
    /// Also sealed with the key in this file (made on first use), so listings can show links.
    Sealed(PathBuf),
    /// Sealed with this key (tests, benchmarks).
    SealedWithKey([u8; 32]),
}

/// A freshly created invite: the only place the token is handed out.
#[derive(Debug)]
pub struct Created {
    pub token: Token,
    pub hash: TokenHash,
    pub record: InviteRecord,
}

impl Created {
    pub fn uri(&self) -> String {
        record_uri(&self.record, &self.token)
    }
}

/// A stored invite, found by the token a caller presented or by its key.
#[derive(Debug)]
pub struct Found {
    pub hash: TokenHash,
    pub record: InviteRecord,
}

/// The URI of an invite, given its token (which the record does not hold).
pub fn record_uri(record: &InviteRecord, token: &Token) -> String {
    let params =
        (record.kind == InviteKind::Roster && record.allow_registration).then_some("ibr=y");
    invite_uri(record.kind.as_str(), &record.jid, token.expose(), params)
}

/// A previously stored invite of Prosody's own `mod_invites`, to be imported.
#[derive(Clone, Debug)]
pub struct LegacyInvite {
    pub kind: InviteKind,
    pub jid: String,
    pub allow_registration: bool,
    pub additional_data: Option<Value>,
    pub created_at: i64,
    pub expires: i64,
    pub reusable: bool,
    /// Set when the token was also stored as a contact invite of this user.
    pub contact_of: Option<String>,
    /// The landing page Prosody stored with it (it holds the token; kept without it).
    pub landing_page: Option<String>,
}

/// What a change of one invite decides to store (see `Book::change`).
enum Next {
    Store(Box<InviteRecord>),
    Remove,
    Keep,
}

/// The outcome of `release` inside its change: the record and uses before it when spent.
enum Releasing {
    Nothing,
    GivenBack,
    Spent(Box<InviteRecord>, u32),
}

/// The invites of one virtual host, over the stores `backend` gives access to.
pub struct Book<B: Backend> {
    backend: B,
    /// The virtual host whose invites these are.
    host: String,
    storage: TokenStorage,
    /// Loaded on first use (`None`: hash only, or the key could not be had).
    sealer: OnceCell<Option<Sealer>>,
    /// Said once: some sealed tokens do not open with this key.
    warned_unopened: Cell<bool>,
    /// The invites this process reserved a use of, by holder, as `reserve` stored them:
    /// `confirm` writes the account's entry from that, without reading the invite again
    /// (see `confirm_by_entry`).
    held: RefCell<HashMap<String, (TokenHash, InviteRecord)>>,
}

/// Registrations in flight whose reservation `held` remembers (those whose lease ran out are
/// dropped to make room: a web registration that failed never says so); past that many, a
/// confirmation reads the invite first.
const HELD_MAX: usize = 1024;

/// A confirmation made at most this long (seconds) after its reservation, with at least
/// `LAPSE_MARGIN` of the lease left, reads no invite: no process sharing the storage can
/// have settled the reservation as lapsed unless its clock is ahead by more than the lease
/// less `FAST_CONFIRM` (110 s of the default 120), and a clock that far ahead settles other
/// processes' fresh reservations as lapsed anyway (leases need clocks that agree).
const FAST_CONFIRM: i64 = 10;
const LAPSE_MARGIN: i64 = 30;

impl<B: Backend> Book<B> {
    /// A book for `host` that keeps only hashes (see `with_token_storage`).
    pub fn new(backend: B, host: &str) -> Book<B> {
        Book {
            backend,
            host: host.to_ascii_lowercase(),
            storage: TokenStorage::Hash,
            sealer: OnceCell::new(),
            warned_unopened: Cell::new(false),
            held: RefCell::new(HashMap::new()),
        }
    }

    pub fn with_token_storage(mut self, storage: TokenStorage) -> Book<B> {
        self.storage = storage;
        self.sealer = OnceCell::new();
        self
    }

    /// The sealer, the key file read (or made) on first use. A key that cannot be had is
    /// said once; invites are then kept as hashes only, and work all the same.
    fn sealer(&self) -> Option<&Sealer> {
        self.sealer
            .get_or_init(|| match &self.storage {
                TokenStorage::Hash => None,
                TokenStorage::SealedWithKey(key) => Some(Sealer::new(key)),
                TokenStorage::Sealed(path) => match load_or_create_key(path) {
                    Ok(key) => {
                        if key_file_is_open_to_others(path) {
                            self.backend.log(
                                Level::Warn,
                                &format!(
                                    "invite_token_key_file {} can be read by other users than \
                                     its owner; make it mode 0600",
                                    path.display()
                                ),
                            );
                        }
                        Some(Sealer::new(&key))
                    }
                    Err(e) => {
                        self.backend.log(
                            Level::Error,
                            &format!(
                                "invite_token_key_file {}: {e}; new invites are kept as hashes \
                                 only (they work, but their links cannot be shown again)",
                                path.display()
                            ),
                        );
                        None
                    }
                },
            })
            .as_ref()
    }

    /// The token of a stored invite, where it was sealed and opens with our key. One
    /// warning when a sealed token does not open (another key, or an edited record).
    pub fn token_of(&self, hash: &TokenHash, record: &InviteRecord) -> Option<Token> {
        let sealed = record.sealed_token.as_deref()?;
        let sealer = self.sealer()?;
        let token = sealer.open(sealed, hash);
        if token.is_none() && !self.warned_unopened.replace(true) {
            let file = match &self.storage {
                TokenStorage::Sealed(path) => path.display().to_string(),
                _ => String::from("(given key)"),
            };
            self.backend.log(
                Level::Warn,
                &format!(
                    "the link of invite {} (and maybe others) cannot be shown: its token was \
                     sealed with another key than invite_token_key_file {file}, or its record \
                     was changed; the invite works, listings show it without a link",
                    hash.short_id()
                ),
            );
        }
        token
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// Refuses to act for another host. Checked before any lookup, so a refusal says
    /// nothing about the token.
    fn acting_here(&self, host: &str) -> Result<(), InviteError> {
        if host.eq_ignore_ascii_case(&self.host) {
            Ok(())
        } else {
            Err(InviteError::WrongHost)
        }
    }

    /// Refuses a record made for another host (copied data, a store shared by mistake).
    fn made_here(&self, hash: &TokenHash, record: &InviteRecord) -> Result<(), InviteError> {
        if record.host().eq_ignore_ascii_case(&self.host) {
            return Ok(());
        }
        self.backend.log(
            Level::Warn,
            &format!(
                "invite {} is stored for {} but names {}; refused",
                hash.short_id(),
                self.host,
                record.host()
            ),
        );
        Err(InviteError::WrongHost)
    }

    fn storage_failed(&self, what: &str, id: &str, e: &StoreError) -> InviteError {
        self.backend
            .log(Level::Error, &format!("could not {what} invite {id}: {e}"));
        InviteError::Storage
    }

    /// Whether a record is stored for `hash` (whatever it holds).
    fn exists(&self, hash: &TokenHash) -> Result<bool, InviteError> {
        match self.backend.get(Space::Invites, &hash.key()) {
            Ok(found) => Ok(found.is_some()),
            Err(e) => Err(self.storage_failed("read", &hash.short_id(), &e)),
        }
    }

    /// Loads the record of `hash`. A record that cannot be decoded is logged once and
    /// reported as `token-invalid`: it never raises and never grants anything.
    fn load(&self, hash: &TokenHash) -> Result<InviteRecord, InviteError> {
        let id = hash.short_id();
        let text = match self.backend.get(Space::Invites, &hash.key()) {
            Ok(Some(text)) => text,
            Ok(None) => return Err(InviteError::TokenInvalid),
            Err(StoreError::Malformed(what)) => {
                self.backend.log(
                    Level::Warn,
                    &format!("ignoring corrupt invite record {id}: {what}"),
                );
                return Err(InviteError::TokenInvalid);
            }
            Err(e) => return Err(self.storage_failed("read", &id, &e)),
        };
        InviteRecord::decode(&text, hash).map_err(|e| {
            self.backend.log(
                Level::Warn,
                &format!("ignoring corrupt invite record {id}: {e}"),
            );
            InviteError::TokenInvalid
        })
    }

    /// One atomic read-check-write of the invite of `hash` (see `Backend::update`).
    /// `decide` is shown the stored record (none, or a corrupt one, is `token-invalid`;
    /// corruption is logged) and says what to store and what to answer. When another
    /// process changed the invite between the read and the write, the write does not
    /// happen and `decide` is shown the record again: whatever else it does must be safe to
    /// do again (`edit` indexes a name: the same entry, written twice).
    fn change<T>(
        &self,
        hash: &TokenHash,
        mut decide: impl FnMut(InviteRecord) -> Result<(Next, T), InviteError>,
    ) -> Result<T, InviteError> {
        let id = hash.short_id();
        let mut answer = None;
        let mut corrupt = None;
        let updated = self
            .backend
            .update(Space::Invites, &hash.key(), &mut |text| {
                corrupt = None;
                let decided = match text.map(|t| InviteRecord::decode(t, hash)) {
                    None => Err(InviteError::TokenInvalid),
                    Some(Err(e)) => {
                        corrupt = Some(e.to_string());
                        Err(InviteError::TokenInvalid)
                    }
                    Some(Ok(record)) => decide(record),
                };
                let write = match &decided {
                    Ok((Next::Store(record), _)) => Write::Put(record.encode()),
                    Ok((Next::Remove, _)) => Write::Remove,
                    Ok((Next::Keep, _)) | Err(_) => Write::Keep,
                };
                answer = Some(decided.map(|(_, t)| t));
                write
            });
        if let Some(what) = corrupt {
            self.backend.log(
                Level::Warn,
                &format!("ignoring corrupt invite record {id}: {what}"),
            );
        }
        match updated {
            Ok(_) => answer.unwrap_or(Err(InviteError::Storage)),
            Err(StoreError::Malformed(what)) => {
                self.backend.log(
                    Level::Warn,
                    &format!("ignoring corrupt invite record {id}: {what}"),
                );
                Err(InviteError::TokenInvalid)
            }
            Err(e) => Err(self.storage_failed("change", &id, &e)),
        }
    }

    /// `change` of the invite as settled (but for the reservation of `except_holder`):
    /// `step` changes it or refuses, and what it made is stored. Answers the record stored
    /// and its uses before, for `enter_redeemed`.
    fn change_settled(
        &self,
        hash: &TokenHash,
        now: i64,
        except_holder: Option<&str>,
        mut step: impl FnMut(&mut InviteRecord) -> Result<(), InviteError>,
    ) -> Result<(InviteRecord, u32), InviteError> {
        self.change(hash, |mut record| {
            let uses_before = record.uses;
            self.settle(hash, &mut record, now, except_holder)?;
            step(&mut record)?;
            Ok((Next::Store(Box::new(record.clone())), (record, uses_before)))
        })
    }

    /// Stores `record` under `hash` unless something is stored there already; whether it
    /// did.
    fn store_new(&self, hash: &TokenHash, record: &InviteRecord) -> Result<bool, InviteError> {
        self.backend
            .insert(Space::Invites, &hash.key(), &record.encode())
            .map_err(|e| self.storage_failed("write", &hash.short_id(), &e))
    }

    /// The hash of the token a caller presented, parsed here once.
    fn hash_of(token: &str) -> Result<TokenHash, InviteError> {
        Ok(Token::parse(token)?.hash())
    }

    /// Settles the reservations of the invite of `hash` whose registration is over: those
    /// whose account's entry says it was registered with this invite (`confirm_account`
    /// writes no more than that entry), and those whose lease ran out (see
    /// `InviteRecord::settle_lapsed`). Returns whether the record changed.
    fn settle(
        &self,
        hash: &TokenHash,
        record: &mut InviteRecord,
        now: i64,
        except_holder: Option<&str>,
    ) -> Result<bool, InviteError> {
        let id = hash.short_id();
        let registered = record.settle_registered(except_holder, &mut |reservation| {
            let (Some(username), Some(since)) = (&reservation.username, reservation.at) else {
                return None;
            };
            // Unreadable: not settled here; the lease settles it.
            let entry = self.read_entry(username).ok()??;
            let registered = entry.registered?;
            (entry.invite.as_deref() == Some(id.as_str()) && registered >= since)
                .then_some(registered)
        });
        let mut failure = None;
        let lapsed = record.settle_lapsed(now, except_holder, &mut |username| {
            match self.backend.account_exists(username) {
                Ok(exists) => exists,
                Err(e) => {
                    failure = Some(e);
                    // Assume the account exists: redeeming a use is the safe side.
                    true
                }
            }
        });
        match failure {
            Some(e) => Err(self.storage_failed("check the accounts of", "-", &e)),
            None => Ok(registered || lapsed),
        }
    }

    /// The invite for the token a caller presented, parsed here once.
    fn find(&self, token: &str) -> Result<(Token, Found), InviteError> {
        let token = Token::parse(token)?;
        let hash = token.hash();
        let record = self.load(&hash)?;
        Ok((token, Found { hash, record }))
    }

    /// `find` for an operation acting for `host`: refused unless that is this host and the
    /// invite's.
    fn find_for(&self, token: &str, host: &str) -> Result<(Token, Found), InviteError> {
        self.acting_here(host)?;
        let (token, found) = self.find(token)?;
        self.made_here(&found.hash, &found.record)?;
        Ok((token, found))
    }

    /// Creates and stores an invite (`prepare`, then `store_created`).
    pub fn create(&self, spec: NewInvite, now: i64) -> Result<Created, InviteError> {
        self.create_with(spec, Provenance::default(), now)
    }

    /// `create`, saying who made the invite and where.
    pub fn create_with(
        &self,
        spec: NewInvite,
        provenance: Provenance,
        now: i64,
    ) -> Result<Created, InviteError> {
        let mut created = self.prepare_with(spec, provenance, now);
        self.store_created(&mut created)?;
        Ok(created)
    }

    /// A new invite with its token, not stored yet: `invite-created` handlers may still
    /// change its `additional_data` and `landing_page` (set them on `record`, the landing
    /// page with `LandingPage::without_token`).
    pub fn prepare(&self, spec: NewInvite, now: i64) -> Created {
        self.prepare_with(spec, Provenance::default(), now)
    }

    /// `prepare`, saying who makes the invite and where.
    pub fn prepare_with(&self, spec: NewInvite, provenance: Provenance, now: i64) -> Created {
        let token = Token::generate();
        let hash = token.hash();
        let record = InviteRecord {
            v: RECORD_VERSION,
            hash: hash.tagged(),
            kind: spec.kind,
            jid: spec.jid,
            allow_registration: spec.allow_registration,
            additional_data: spec.additional_data,
            created_at: now,
            expires: now.saturating_add(spec.ttl),
            reusable: spec.reusable || spec.max_uses.is_some_and(|n| n > 1),
            max_uses: spec.max_uses,
            uses: 0,
            state: StoredState::Pending,
            changed_at: None,
            reservations: Vec::new(),
            username: spec.username,
            reset: spec.reset,
            inviter: spec.inviter,
            sealed_token: None,
            landing_page: None,
            creator: provenance.creator,
            source: provenance.source,
            note: provenance.note,
            redemptions: Vec::new(),
        };
        Created {
            token,
            hash,
            record,
        }
    }

    /// Stores an invite made by `prepare` (its token sealed, where tokens are).
    pub fn store_created(&self, created: &mut Created) -> Result<(), InviteError> {
        let Created {
            token,
            hash,
            record,
        } = created;
        record.sealed_token = self.sealer().and_then(|s| s.seal(token, hash));
        if !self.store_new(hash, record)? {
            // Two tokens of 144 random bits alike: not in this universe, but never overwrite.
            self.backend.log(
                Level::Error,
                &format!("invite {} is stored already; not made", hash.short_id()),
            );
            return Err(InviteError::Storage);
        }
        if let Some(name) = reserved_name(record) {
            if let Err(e) = self.index_name(name, hash, record.expires) {
                // Without its reservation the invite must not exist: undo.
                if let Err(undo) = self.backend.put(Space::Invites, &hash.key(), None) {
                    self.backend.log(
                        Level::Error,
                        &format!(
                            "could not remove invite {} after failing to reserve its \
                             username: {undo}; it stays stored without the reservation",
                            hash.short_id()
                        ),
                    );
                }
                return Err(e);
            }
        }
        self.backend.log(
            Level::Debug,
            &format!(
                "created {} invite {}",
                record.kind.as_str(),
                hash.short_id()
            ),
        );
        Ok(())
    }

    /// A valid invite for `token`, for account creation (`contact_of` = None) or for
    /// subscribing to the local user `contact_of` (XEP-0379), on `host`. Gives the token
    /// back parsed, for the caller to build the invite's links with.
    pub fn validate(
        &self,
        token: &str,
        contact_of: Option<&str>,
        host: &str,
        now: i64,
    ) -> Result<(Token, Found), InviteError> {
        let (token, mut found) = self.find_for(token, host)?;
        if self.settle(&found.hash, &mut found.record, now, None)? {
            // Written so listings show it too; if that fails (logged), checking goes on
            // from the settled copy: a read must not fail for want of a write.
            let _ = self.settle_stored(&found.hash, now);
        }
        Self::usable_for(&found.record, contact_of, now)?;
        Ok((token, found))
    }

    /// Writes back what `settle` makes of the stored invite of `hash`, if anything.
    fn settle_stored(&self, hash: &TokenHash, now: i64) -> Result<(), InviteError> {
        let settled = self.change(hash, |mut record| {
            let uses_before = record.uses;
            if !self.settle(hash, &mut record, now, None)? {
                return Ok((Next::Keep, None));
            }
            Ok((
                Next::Store(Box::new(record.clone())),
                Some((record, uses_before)),
            ))
        })?;
        if let Some((record, uses_before)) = settled {
            self.enter_redeemed(hash, &record, uses_before);
        }
        Ok(())
    }

    /// Whether the (settled) invite `r` may be used now: for an account, or for becoming
    /// the contact of `contact_of`.
    fn usable_for(r: &InviteRecord, contact_of: Option<&str>, now: i64) -> Result<(), InviteError> {
        match contact_of {
            Some(user) => {
                if r.kind != InviteKind::Roster || r.inviter.as_deref() != Some(user) {
                    return Err(InviteError::TokenInvalid);
                }
            }
            None => {
                if !r.allow_registration {
                    return Err(InviteError::TokenInvalid);
                }
            }
        }
        r.check_valid(now)
    }

    /// Holds one use for the registration `claim` describes, of an account on `host`; see
    /// `state.rs`.
    pub fn reserve(
        &self,
        token: &str,
        claim: &Claim<'_>,
        host: &str,
        now: i64,
    ) -> Result<Found, InviteError> {
        self.acting_here(host)?;
        let hash = Self::hash_of(token)?;
        let (mut record, uses_before) = self.change_settled(&hash, now, None, |record| {
            self.made_here(&hash, record)?;
            record.reserve(claim, now)?;
            if record.username.as_deref() != Some(claim.username) && record.reset.is_none() {
                // The name may be held for somebody else's invite.
                if self.username_reserved(claim.username, now, Some(&hash))? {
                    return Err(InviteError::UsernameReserved);
                }
            }
            Ok(())
        })?;
        self.enter_redeemed(&hash, &record, uses_before);
        self.remember_held(claim.holder, &hash, &mut record, now);
        Ok(Found { hash, record })
    }

    /// The registration holding `holder` (of an account on `host`) succeeded: its use is
    /// redeemed.
    pub fn confirm(
        &self,
        token: &str,
        holder: &str,
        host: &str,
        now: i64,
    ) -> Result<Found, InviteError> {
        self.confirm_account(token, holder, None, host, now)
    }

    /// `confirm`, naming the account registered (or reset) for when the reservation no
    /// longer does (see `InviteRecord::confirm_for`). The account enters the invite tree.
    pub fn confirm_account(
        &self,
        token: &str,
        holder: &str,
        account: Option<&str>,
        host: &str,
        now: i64,
    ) -> Result<Found, InviteError> {
        self.acting_here(host)?;
        let hash = Self::hash_of(token)?;
        if let Some(found) = self.confirm_by_entry(&hash, holder, account, now)? {
            return Ok(found);
        }
        let mut overspent = false;
        let confirmed = self.change_settled(&hash, now, Some(holder), |record| {
            self.made_here(&hash, record)?;
            let outcome = record.confirm_for(holder, account, now);
            overspent = outcome.is_err();
            outcome
        });
        if overspent {
            self.backend.log(
                Level::Warn,
                &format!(
                    "an account was created after every use of invite {} was spent",
                    hash.short_id()
                ),
            );
        }
        let (record, uses_before) = confirmed?;
        self.after_change(&hash, &record);
        self.enter_redeemed(&hash, &record, uses_before);
        Ok(Found { hash, record })
    }

    /// Remembers the invite as `reserve` stored it for `holder`, for `confirm_by_entry`:
    /// what it needs of it (not the redemptions, note, landing page or additional data, so
    /// that a full map of large invites stays small, and a reservation of a reusable invite
    /// does not copy its redemptions). Not for resets, which it never takes.
    fn remember_held(&self, holder: &str, hash: &TokenHash, record: &mut InviteRecord, now: i64) {
        if record.reset.is_some() {
            return;
        }
        let mut held = self.held.borrow_mut();
        if held.len() >= HELD_MAX {
            held.retain(|holder, (_, r)| {
                Self::held_for(r, holder).is_some_and(|(_, _, until)| until >= now)
            });
        }
        if held.len() < HELD_MAX {
            let redemptions = std::mem::take(&mut record.redemptions);
            let mut kept = record.clone();
            record.redemptions = redemptions;
            kept.note = None;
            kept.landing_page = None;
            kept.additional_data = None;
            held.insert(holder.to_owned(), (*hash, kept));
        }
    }

    /// `confirm_account` without writing the invite, where the reservation names its account
    /// and when it was made: the account's entry in the invite tree, which a registration
    /// writes anyway, says it was registered with this invite, and that makes `settle`
    /// count the reservation as spent wherever the invite is read next (a process that
    /// wrote the invite then writes the use in). One write of the invite per registration,
    /// not two.
    ///
    /// The entry is written from the invite as `reserve` stored it (what it takes from it
    /// never changes). The entry spends the use only while the reservation is still there,
    /// and only a lapse takes one away (release is its own registration's, revocation
    /// keeps it, an edit too): confirmed within `FAST_CONFIRM` of the reservation and with
    /// `LAPSE_MARGIN` of the lease left, nothing is read. Otherwise the invite is read
    /// after the entry. The answer is the invite as reserved, with this use spent. `None`
    /// where this does not apply (a reset, a reservation gone or of an earlier version, a
    /// host without the tree's store) or the entry could not be written: then the invite
    /// is written as before.
    fn confirm_by_entry(
        &self,
        hash: &TokenHash,
        holder: &str,
        account: Option<&str>,
        now: i64,
    ) -> Result<Option<Found>, InviteError> {
        let cached = self.held.borrow_mut().remove(holder);
        if !self.backend.keeps(Space::Accounts) {
            return Ok(None);
        }
        let mut record = match cached {
            Some((h, record)) if h == *hash => record,
            _ => self.load(hash)?,
        };
        self.made_here(hash, &record)?;
        let Some((username, at, until)) = Self::held_for(&record, holder) else {
            return Ok(None);
        };
        if account.is_some_and(|a| a != username) {
            return Ok(None);
        }
        if self.enter_account(&username, hash, &record, now).is_err() {
            return Ok(None);
        }
        if now.saturating_sub(at) > FAST_CONFIRM || until.saturating_sub(now) < LAPSE_MARGIN {
            // It may have lapsed, and been settled elsewhere (its use given back) before
            // the entry was there. Then the invite is written as before (unless a process
            // that read the entry already counted the use: its redemption names the
            // account and the entry's time).
            record = self.load(hash)?;
            if Self::held_for(&record, holder).is_none() {
                let counted = record
                    .redemptions
                    .iter()
                    .any(|r| r.account.as_deref() == Some(username.as_str()) && r.at == now);
                return Ok(counted.then_some(Found {
                    hash: *hash,
                    record,
                }));
            }
        }
        // What the caller is told: the invite as last read, with this use spent.
        record.confirm_for(holder, Some(&username), now)?;
        self.after_change(hash, &record);
        Ok(Some(Found {
            hash: *hash,
            record,
        }))
    }

    /// The account the reservation of `holder` is for, when it was made and when its lease
    /// ends, where it names an account and when it was made (reservations of this version).
    fn held_for(record: &InviteRecord, holder: &str) -> Option<(String, i64, i64)> {
        let held = record.reservations.iter().find(|r| r.holder == holder)?;
        Some((held.username.clone()?, held.at?, held.until))
    }

    /// The registration holding `holder` failed. Its use is given back, unless the account
    /// it was for exists after all (Prosody 13 creates the account before writing its
    /// password and keeps it when that fails): then the use is redeemed.
    pub fn release(&self, token: &str, holder: &str, now: i64) -> Result<Released, InviteError> {
        self.held.borrow_mut().remove(holder);
        let hash = Self::hash_of(token)?;
        let released = self.change(&hash, |mut record| {
            let Some(held) = record.reservations.iter().find(|r| r.holder == holder) else {
                return Ok((Next::Keep, Releasing::Nothing));
            };
            let account_created = match &held.username {
                Some(username) => self.backend.account_exists(username).map_err(|e| {
                    self.storage_failed("check the account of", &hash.short_id(), &e)
                })?,
                None => false,
            };
            if account_created {
                let uses_before = record.uses;
                record.confirm(holder, now)?;
                return Ok((
                    Next::Store(Box::new(record.clone())),
                    Releasing::Spent(Box::new(record), uses_before),
                ));
            }
            record.release(holder);
            Ok((Next::Store(Box::new(record)), Releasing::GivenBack))
        })?;
        match released {
            Releasing::Nothing => Ok(Released::Nothing),
            Releasing::GivenBack => Ok(Released::GivenBack),
            Releasing::Spent(record, uses_before) => {
                self.after_change(&hash, &record);
                self.enter_redeemed(&hash, &record, uses_before);
                Ok(Released::Spent)
            }
        }
    }

    /// Redeems one use directly (`invite:use()`, accepted XEP-0379 subscriptions), on `host`.
    pub fn redeem(
        &self,
        token: &str,
        contact_of: Option<&str>,
        host: &str,
        now: i64,
    ) -> Result<Found, InviteError> {
        self.redeem_account(token, contact_of, None, host, now)
    }

    /// `redeem`, naming the account the use is for. Unless it is a subscription to
    /// `contact_of` or a password reset, that account was created with the invite, and
    /// enters the invite tree.
    pub fn redeem_account(
        &self,
        token: &str,
        contact_of: Option<&str>,
        account: Option<&str>,
        host: &str,
        now: i64,
    ) -> Result<Found, InviteError> {
        self.acting_here(host)?;
        let hash = Self::hash_of(token)?;
        let (record, uses_before) = self.change_settled(&hash, now, None, |record| {
            self.made_here(&hash, record)?;
            Self::usable_for(record, contact_of, now)?;
            record.redeem_by(account, now)
        })?;
        self.after_change(&hash, &record);
        if contact_of.is_none() {
            self.enter_redeemed(&hash, &record, uses_before);
        }
        Ok(Found { hash, record })
    }

    /// Revokes the invite for `token`. One that is over already (used, revoked or expired)
    /// is left as it is and named in the error: `token-used`, `token-revoked`,
    /// `token-expired`.
    pub fn revoke(&self, token: &str, now: i64) -> Result<Found, InviteError> {
        self.revoke_hash(&Self::hash_of(token)?, now, false)
    }

    /// Revokes the invite of `hash` (admin commands name invites by key or id).
    pub fn revoke_key(&self, hash: &TokenHash, now: i64) -> Result<Found, InviteError> {
        self.revoke_hash(hash, now, false)
    }

    /// Revokes a found invite still to be had; with `expired_too`, also one that only ran
    /// out of time (so that no edit can give it new life), still answering `token-expired`.
    fn revoke_hash(
        &self,
        hash: &TokenHash,
        now: i64,
        expired_too: bool,
    ) -> Result<Found, InviteError> {
        let mut expired = false;
        let (record, uses_before) = self.change_settled(hash, now, None, |record| {
            expired = false;
            match record.status(now) {
                Status::Pending | Status::Reserved => {}
                Status::Used => return Err(InviteError::TokenUsed),
                Status::Revoked => return Err(InviteError::TokenRevoked),
                Status::Expired if expired_too => expired = true,
                Status::Expired => return Err(InviteError::TokenExpired),
            }
            record.revoke(now);
            Ok(())
        })?;
        self.after_change(hash, &record);
        if expired {
            return Err(InviteError::TokenExpired);
        }
        self.enter_redeemed(hash, &record, uses_before);
        Ok(Found {
            hash: *hash,
            record,
        })
    }

    /// Applies an administrator's changes to the invite of `hash` (see
    /// `InviteRecord::edit`), in one read-check-write: an invite nobody stored is
    /// `no-such-invite`. A bound username stays held until the new expiry.
    pub fn edit(&self, hash: &TokenHash, edit: &Edit, now: i64) -> Result<Found, InviteError> {
        let edited = self.change_settled(hash, now, None, |record| {
            let expires_before = record.expires;
            record.edit(edit, now)?;
            if record.expires != expires_before {
                if let Some(name) = reserved_name(record) {
                    // Before the record: a later expiry in the index than in the record
                    // holds nothing (`username_reserved` reads the record), an earlier one
                    // could.
                    self.index_name(name, hash, record.expires)?;
                }
            }
            Ok(())
        });
        let (record, uses_before) = match edited {
            Err(InviteError::TokenInvalid) => return Err(InviteError::NoSuchInvite),
            edited => edited?,
        };
        self.after_change(hash, &record);
        self.enter_redeemed(hash, &record, uses_before);
        self.backend
            .log(Level::Debug, &format!("edited invite {}", hash.short_id()));
        Ok(Found {
            hash: *hash,
            record,
        })
    }

    /// Revokes every invite still to be had that is `username`'s (made by them, or a
    /// contact invite to them). Returns how many it revoked. Those that only ran out of
    /// time are revoked too, uncounted, so that no edit revives them. Goes on past a
    /// failure, and reports the first.
    pub fn revoke_by(&self, username: &str, now: i64) -> Result<usize, InviteError> {
        let mut hashes = Vec::new();
        self.backend
            .each_key(Space::Invites, &mut |key| {
                // Owners that are no key are no invites.
                hashes.extend(TokenHash::from_key(key));
                true
            })
            .map_err(|e| self.storage_failed("list for revoking", "invites", &e))?;
        let mut revoked = 0;
        let mut failure = None;
        for hash in hashes {
            let record = match self.load(&hash) {
                Ok(record) => record,
                // Corrupt: logged, and revokes nothing.
                Err(InviteError::TokenInvalid) => continue,
                Err(e) => {
                    failure.get_or_insert(e);
                    continue;
                }
            };
            if !record.is_from(username) {
                continue;
            }
            match self.revoke_hash(&hash, now, true) {
                Ok(_) => revoked += 1,
                Err(
                    InviteError::TokenUsed | InviteError::TokenRevoked | InviteError::TokenExpired,
                ) => {}
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(revoked),
        }
    }

    /// The invite tree's entry of `username`, if it has one.
    pub fn account(&self, username: &str) -> Result<Option<AccountEntry>, InviteError> {
        self.read_entry(username)
    }

    /// `username` registered without an invite: its entry says when, and that nobody
    /// invited it. An account the tree knows as registered (and not deleted) is left as it is.
    pub fn account_registered(&self, username: &str, now: i64) -> Result<(), InviteError> {
        self.change_entry(
            username,
            |e| e,
            |entry| {
                if entry.registered.is_some() && entry.deleted.is_none() {
                    return Ok(false);
                }
                entry.by = None;
                entry.source = None;
                entry.invite = None;
                entry.registered = Some(now);
                entry.deleted = None;
                Ok(true)
            },
        )
    }

    /// `username` was deleted: its invites still to be had are revoked (see `revoke_by`),
    /// and its entry (made if there was none) says when, so the tree still shows it.
    /// Returns how many invites it revoked.
    pub fn account_deleted(&self, username: &str, now: i64) -> Result<usize, InviteError> {
        let revoked = self.revoke_by(username, now);
        let marked = self.change_entry(
            username,
            |e| e,
            |entry| {
                entry.deleted = Some(now);
                Ok(true)
            },
        );
        let revoked = revoked?;
        marked?;
        Ok(revoked)
    }

    /// May `username` make an invite now, under `rule`? If so, the invite is counted
    /// against its quota (see `quota.rs`); if not, why and from when it may.
    pub fn charge(&self, username: &str, rule: &Rule, now: i64) -> Result<(), Refusal> {
        let failed = |error| Refusal {
            error,
            retry_at: None,
        };
        self.change_entry(username, failed, |entry| {
            quota::charge(entry, rule, now)?;
            Ok(true)
        })
    }

    /// Gives back the charge `charge` made at `at` for an invite that was never made.
    pub fn refund(&self, username: &str, at: i64) -> Result<(), InviteError> {
        self.change_entry(username, |e| e, |entry| Ok(quota::refund(entry, at)))
    }

    /// The invite an admin means by `reference`: a token, a handle (the full key), or a
    /// unique end of at least four hex digits of a key (an id as `list` shows it).
    /// `keys` walks the keys of the invite store (only needed for an id); it stops when
    /// `visit` says so. Owners of that store that are no key are not invites, and skipped.
    pub fn resolve(
        &self,
        reference: &str,
        keys: impl FnOnce(&mut dyn FnMut(&str) -> bool) -> Result<(), InviteError>,
    ) -> Result<TokenHash, InviteError> {
        if let Ok(token) = Token::parse(reference) {
            let hash = token.hash();
            if self.exists(&hash)? {
                return Ok(hash);
            }
        }
        let id = reference.to_ascii_lowercase();
        if id.len() < 4 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(InviteError::NoSuchInvite);
        }
        if let Some(hash) = TokenHash::from_key(&id) {
            return if self.exists(&hash)? {
                Ok(hash)
            } else {
                Err(InviteError::NoSuchInvite)
            };
        }
        let mut found: Option<TokenHash> = None;
        let mut ambiguous = false;
        keys(&mut |key| {
            let Some(hash) = TokenHash::from_key(key).filter(|_| key.ends_with(&id)) else {
                return true;
            };
            if found.is_some() {
                ambiguous = true;
                return false;
            }
            found = Some(hash);
            true
        })?;
        match found {
            _ if ambiguous => Err(InviteError::AmbiguousId),
            Some(hash) => Ok(hash),
            None => Err(InviteError::NoSuchInvite),
        }
    }

    /// Removes the record of `hash` if the invite is over (used, revoked or expired) and
    /// has been for `keep` seconds. Returns whether it was removed.
    pub fn prune(&self, hash: &TokenHash, now: i64, keep: i64) -> Result<bool, InviteError> {
        let removed = self.change(hash, |mut record| {
            let uses_before = record.uses;
            self.settle(hash, &mut record, now, None)?;
            let over_since = match record.status(now) {
                Status::Pending | Status::Reserved => return Ok((Next::Keep, None)),
                Status::Expired => record.expires,
                Status::Used | Status::Revoked => record.changed_at.unwrap_or(record.expires),
            };
            if over_since.saturating_add(keep) > now {
                return Ok((Next::Keep, None));
            }
            Ok((Next::Remove, Some((record, uses_before))))
        });
        let (record, uses_before) = match removed {
            Ok(Some(removed)) => removed,
            Ok(None) => return Ok(false),
            // Corrupt records stay for an admin to look at; unknown keys are not ours.
            Err(InviteError::TokenInvalid) => return Ok(false),
            Err(e) => return Err(e),
        };
        let mut gone = record;
        gone.state = StoredState::Revoked;
        self.after_change(hash, &gone);
        self.enter_redeemed(hash, &gone, uses_before);
        Ok(true)
    }

    /// Is `username` held for a pending invite (other than the one of `except`)?
    pub fn username_reserved(
        &self,
        username: &str,
        now: i64,
        except: Option<&TokenHash>,
    ) -> Result<bool, InviteError> {
        let index = match self.load_index(username)? {
            Some(index) => index,
            None => return Ok(false),
        };
        for (key, expires) in &index.invites {
            let Some(hash) = TokenHash::from_key(key) else {
                // Not a key we write: no invite to hold the name.
                continue;
            };
            if Some(&hash) == except || *expires < now {
                continue;
            }
            match self.load(&hash) {
                Ok(record) if record.check_valid(now).is_ok() => return Ok(true),
                Ok(_) | Err(InviteError::TokenInvalid) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }

    /// The record of `hash`, for listings, with reservations a crash left behind settled
    /// (in the copy only). Corrupt records are logged and skipped.
    pub fn listed(&self, hash: &TokenHash, now: i64) -> Result<Option<InviteRecord>, InviteError> {
        match self.load(hash) {
            Ok(mut record) => {
                self.settle(hash, &mut record, now, None)?;
                Ok(Some(record))
            }
            Err(InviteError::TokenInvalid) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Imports one invite of Prosody's own store under its token's hash. Returns whether
    /// a record was written (expired or already imported invites are not).
    pub fn import_legacy(
        &self,
        token: &str,
        legacy: LegacyInvite,
        now: i64,
    ) -> Result<bool, InviteError> {
        // An expired entry is dropped whatever its token looks like.
        if now > legacy.expires {
            return Ok(false);
        }
        let token = Token::parse(token)?;
        let hash = token.hash();
        let (username, reset) = legacy_binding(&legacy);
        let inviter = match legacy.kind {
            InviteKind::Roster => legacy
                .contact_of
                .clone()
                .or_else(|| node_of(&legacy.jid).map(str::to_owned)),
            InviteKind::Register => None,
        };
        let record = InviteRecord {
            v: RECORD_VERSION,
            hash: hash.tagged(),
            kind: legacy.kind,
            jid: legacy.jid,
            allow_registration: legacy.allow_registration,
            additional_data: legacy.additional_data,
            created_at: legacy.created_at,
            expires: legacy.expires,
            reusable: legacy.reusable,
            max_uses: None,
            uses: 0,
            state: StoredState::Pending,
            changed_at: None,
            reservations: Vec::new(),
            username,
            reset,
            inviter,
            sealed_token: self.sealer().and_then(|s| s.seal(&token, &hash)),
            landing_page: legacy
                .landing_page
                .as_deref()
                .map(|url| LandingPage::without_token(url, &token)),
            creator: None,
            source: None,
            note: None,
            redemptions: Vec::new(),
        };
        if !self.store_new(&hash, &record)? {
            // Imported already (by this process, or another sharing the storage).
            return Ok(false);
        }
        if let Some(name) = reserved_name(&record) {
            self.index_name(name, &hash, record.expires)?;
        }
        self.backend.log(
            Level::Info,
            &format!(
                "imported {} invite {} from mod_invites",
                record.kind.as_str(),
                hash.short_id()
            ),
        );
        Ok(true)
    }

    /// The entry of `username` in the invite tree. A corrupt one is logged and read as none
    /// (the next write replaces it).
    fn read_entry(&self, username: &str) -> Result<Option<AccountEntry>, InviteError> {
        let text = match self.backend.get(Space::Accounts, &entry_key(username)) {
            Ok(Some(text)) => text,
            Ok(None) => return Ok(None),
            Err(StoreError::Malformed(what)) => {
                self.backend.log(
                    Level::Warn,
                    &format!("ignoring corrupt account entry of {username}: {what}"),
                );
                return Ok(None);
            }
            Err(e) => return Err(self.entry_failed("read", username, &e)),
        };
        match AccountEntry::decode(&text) {
            Ok(entry) => Ok(Some(entry)),
            Err(e) => {
                self.backend.log(
                    Level::Warn,
                    &format!("ignoring corrupt account entry of {username}: {e}"),
                );
                Ok(None)
            }
        }
    }

    /// One atomic read-check-write of the entry of `username` (see `Backend::update`):
    /// `decide` is shown it (none, or a corrupt one, as a new entry) and changes it, saying
    /// whether to store it. It may be shown the entry again when another process wrote it.
    fn change_entry<E>(
        &self,
        username: &str,
        failed: impl Fn(InviteError) -> E,
        mut decide: impl FnMut(&mut AccountEntry) -> Result<bool, E>,
    ) -> Result<(), E> {
        let mut refused = None;
        let updated = self
            .backend
            .update(Space::Accounts, &entry_key(username), &mut |text| {
                let mut entry = match text.map(AccountEntry::decode) {
                    Some(Ok(entry)) => entry,
                    Some(Err(e)) => {
                        self.backend.log(
                            Level::Warn,
                            &format!("ignoring corrupt account entry of {username}: {e}"),
                        );
                        AccountEntry::new()
                    }
                    None => AccountEntry::new(),
                };
                refused = None;
                match decide(&mut entry) {
                    Ok(true) => Write::Put(entry.encode()),
                    Ok(false) => Write::Keep,
                    Err(e) => {
                        refused = Some(e);
                        Write::Keep
                    }
                }
            });
        if let Some(e) = refused {
            return Err(e);
        }
        match updated {
            Ok(_) => Ok(()),
            Err(StoreError::Malformed(what)) => {
                // The slot holds what no entry is: replace it.
                self.backend.log(
                    Level::Warn,
                    &format!("ignoring corrupt account entry of {username}: {what}"),
                );
                let mut entry = AccountEntry::new();
                if decide(&mut entry)? {
                    self.backend
                        .put(Space::Accounts, &entry_key(username), Some(&entry.encode()))
                        .map_err(|e| failed(self.entry_failed("write", username, &e)))?;
                }
                Ok(())
            }
            Err(e) => Err(failed(self.entry_failed("write", username, &e))),
        }
    }

    fn entry_failed(&self, what: &str, username: &str, e: &StoreError) -> InviteError {
        self.backend.log(
            Level::Error,
            &format!("could not {what} the account entry of {username}: {e}"),
        );
        InviteError::Storage
    }

    /// Enters in the invite tree the accounts that the uses redeemed since the invite had
    /// `uses_before` created: not password resets, nor uses that named no account.
    /// Best effort, after the invite is written: failures are logged.
    fn enter_redeemed(&self, hash: &TokenHash, record: &InviteRecord, uses_before: u32) {
        let new = usize::try_from(record.uses.saturating_sub(uses_before)).unwrap_or(usize::MAX);
        let from = record.redemptions.len().saturating_sub(new);
        for redemption in record.redemptions.iter().skip(from) {
            if redemption.reset {
                continue;
            }
            if let Some(child) = &redemption.account {
                let _ = self.enter_account(child, hash, record, redemption.at);
            }
        }
    }

    /// `child` was created with the invite of `hash` at `at`: its entry says so, and the
    /// invite's creator's lists it. Entering the same account twice changes nothing.
    fn enter_account(
        &self,
        child: &str,
        hash: &TokenHash,
        record: &InviteRecord,
        at: i64,
    ) -> Result<(), InviteError> {
        let id = hash.short_id();
        let by = record.invited_by();
        self.change_entry(
            child,
            |e| e,
            |entry| {
                let entered = entry.invite.as_deref() == Some(id.as_str())
                    && entry.registered.is_some()
                    && entry.deleted.is_none();
                if entered {
                    return Ok(false);
                }
                entry.by = by.map(str::to_owned);
                entry.source.clone_from(&record.source);
                entry.invite = Some(id.clone());
                entry.registered = Some(at);
                entry.deleted = None;
                Ok(true)
            },
        )?;
        if let Some(parent) = by {
            self.change_entry(parent, |e| e, |entry| Ok(entry.add_invited(child)))?;
        }
        Ok(())
    }

    fn load_index(&self, username: &str) -> Result<Option<NameIndex>, InviteError> {
        match self.backend.get(Space::Names, username) {
            Ok(None) => Ok(None),
            Ok(Some(text)) => match NameIndex::decode(&text) {
                Ok(index) => Ok(Some(index)),
                Err(e) => {
                    self.backend.log(
                        Level::Warn,
                        &format!("ignoring corrupt username index: {e}"),
                    );
                    Ok(None)
                }
            },
            Err(StoreError::Malformed(what)) => {
                self.backend.log(
                    Level::Warn,
                    &format!("ignoring corrupt username index: {what}"),
                );
                Ok(None)
            }
            Err(e) => Err(self.storage_failed("read username index for", "-", &e)),
        }
    }

    fn index_name(
        &self,
        username: &str,
        hash: &TokenHash,
        expires: i64,
    ) -> Result<(), InviteError> {
        self.backend
            .update(Space::Names, username, &mut |text| {
                let mut index = text
                    .and_then(|t| NameIndex::decode(t).ok())
                    .unwrap_or(NameIndex {
                        v: RECORD_VERSION,
                        ..NameIndex::default()
                    });
                index.invites.insert(hash.key(), expires);
                Write::Put(index.encode())
            })
            .map(|_| ())
            .map_err(|e| self.storage_failed("index", &hash.short_id(), &e))
    }

    /// Once an invite can no longer register anybody, it stops reserving its name.
    /// Best effort: a stale index entry is ignored by `username_reserved` anyway.
    fn after_change(&self, hash: &TokenHash, record: &InviteRecord) {
        if record.state == StoredState::Pending {
            return;
        }
        let Some(name) = reserved_name(record) else {
            return;
        };
        let key = hash.key();
        let updated = self.backend.update(Space::Names, name, &mut |text| {
            let Some(mut index) = text.and_then(|t| NameIndex::decode(t).ok()) else {
                return Write::Keep;
            };
            if index.invites.remove(&key).is_none() {
                Write::Keep
            } else if index.invites.is_empty() {
                Write::Remove
            } else {
                Write::Put(index.encode())
            }
        });
        if let Err(e) = updated {
            self.backend.log(
                Level::Warn,
                &format!(
                    "could not update username index for invite {}: {e}",
                    hash.short_id()
                ),
            );
        }
    }
}

/// The username an invite holds for its invitee: bound account invites, not resets.
fn reserved_name(record: &InviteRecord) -> Option<&str> {
    if record.reset.is_some() || !record.allow_registration {
        return None;
    }
    record.username.as_deref()
}

fn node_of(jid: &str) -> Option<&str> {
    jid.split_once('@')
        .map(|(node, _)| node)
        .filter(|n| !n.is_empty())
}

fn legacy_binding(legacy: &LegacyInvite) -> (Option<String>, Option<String>) {
    let reset = legacy
        .additional_data
        .as_ref()
        .and_then(|d| d.get("allow_reset"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let username = match legacy.kind {
        InviteKind::Register => node_of(&legacy.jid).map(str::to_owned),
        InviteKind::Roster => None,
    };
    (username, reset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryBackend;
    use std::cell::RefCell;
    use std::rc::Rc;

    const HOST: &str = "example.com";

    fn book() -> Book<MemoryBackend> {
        Book::new(MemoryBackend::new(), HOST)
    }

    fn account(username: Option<&str>) -> NewInvite {
        NewInvite {
            kind: InviteKind::Register,
            jid: match username {
                Some(u) => format!("{u}@example.com"),
                None => String::from("example.com"),
            },
            allow_registration: true,
            additional_data: None,
            ttl: 100,
            reusable: false,
            max_uses: None,
            username: username.map(str::to_owned),
            reset: None,
            inviter: None,
        }
    }

    fn contact(inviter: &str, allow_registration: bool) -> NewInvite {
        NewInvite {
            kind: InviteKind::Roster,
            jid: format!("{inviter}@example.com"),
            allow_registration,
            additional_data: None,
            ttl: 100,
            reusable: false,
            max_uses: None,
            username: None,
            reset: None,
            inviter: Some(inviter.to_owned()),
        }
    }

    fn claim<'a>(holder: &'a str, username: &'a str, now: i64) -> Claim<'a> {
        Claim {
            holder,
            username,
            account_exists: false,
            validated_at: now,
            lease_until: now + 60,
        }
    }

    fn everything_stored(b: &Book<MemoryBackend>) -> String {
        let slots = b.backend().slots.borrow();
        slots
            .iter()
            .map(|((_, k), v)| format!("{k}={v}\n"))
            .collect()
    }

    #[test]
    fn create_stores_one_record_under_the_hash_and_never_the_token() {
        let b = book();
        let c = b.create(account(None), 1000).unwrap();
        assert_eq!(b.backend().count(Space::Invites), 1);
        let token = c.token.expose().to_owned();
        assert!(!everything_stored(&b).contains(&token));
        assert!(b
            .backend()
            .logs
            .borrow()
            .iter()
            .all(|(_, m)| !m.contains(&token)));
        assert_eq!(c.hash, c.token.hash());
        assert_eq!(
            c.uri(),
            format!("xmpp:example.com?register;preauth={token}")
        );
        assert_eq!(c.record.expires, 1100);
    }

    #[test]
    fn validate_finds_valid_invites_and_refuses_the_rest() {
        let b = book();
        let c = b.create(account(None), 1000).unwrap();
        let t = c.token.expose();
        assert!(b.validate(t, None, HOST, 1050).is_ok());
        assert_eq!(
            b.validate(t, None, HOST, 1101).err(),
            Some(InviteError::TokenExpired)
        );
        assert_eq!(
            b.validate("unknown", None, HOST, 1050).err(),
            Some(InviteError::TokenInvalid)
        );
        assert_eq!(
            b.validate("bad token!", None, HOST, 1050).err(),
            Some(InviteError::TokenInvalid)
        );
        assert_eq!(
            b.validate("", None, HOST, 1050).err(),
            Some(InviteError::NoToken)
        );
        // An account invite is no contact invite.
        assert_eq!(
            b.validate(t, Some("romeo"), HOST, 1050).err(),
            Some(InviteError::TokenInvalid)
        );
    }

    #[test]
    fn two_sessions_one_single_use_token_one_account() {
        let b = book();
        let c = b.create(account(None), 1000).unwrap();
        let t = c.token.expose();
        // preauth A, preauth B
        b.validate(t, None, HOST, 1001).unwrap();
        b.validate(t, None, HOST, 1001).unwrap();
        // register A
        b.reserve(t, &claim("A", "alice", 1001), HOST, 1002)
            .unwrap();
        b.confirm(t, "A", HOST, 1002).unwrap();
        // register B
        assert_eq!(
            b.reserve(t, &claim("B", "bob", 1001), HOST, 1003).err(),
            Some(InviteError::TokenUsed)
        );
        // A again, for another account
        assert_eq!(
            b.reserve(t, &claim("A", "carol", 1001), HOST, 1003).err(),
            Some(InviteError::TokenUsed)
        );
        let record = b.validate(t, None, HOST, 1003).err();
        assert_eq!(record, Some(InviteError::TokenUsed));
    }

    #[test]
    fn failed_registration_does_not_redeem() {
        let b = book();
        let c = b.create(account(None), 1000).unwrap();
        let t = c.token.expose();
        b.reserve(t, &claim("A", "alice", 1001), HOST, 1001)
            .unwrap();
        assert_eq!(b.release(t, "A", 1002).unwrap(), Released::GivenBack);
        b.reserve(t, &claim("A", "alice2", 1001), HOST, 1002)
            .unwrap();
        b.confirm(t, "A", HOST, 1002).unwrap();
    }

    #[test]
    fn bound_username_is_reserved_while_pending() {
        let b = book();
        let c = b.create(account(Some("alice")), 1000).unwrap();
        let other = b.create(account(None), 1000).unwrap();
        assert!(b.username_reserved("alice", 1001, None).unwrap());
        assert!(!b.username_reserved("bob", 1001, None).unwrap());
        // Another invite cannot take the name...
        assert_eq!(
            b.reserve(other.token.expose(), &claim("B", "alice", 1001), HOST, 1001)
                .err(),
            Some(InviteError::UsernameReserved)
        );
        // ...and the bound invite registers only alice.
        let t = c.token.expose();
        assert_eq!(
            b.reserve(t, &claim("A", "mallory", 1001), HOST, 1001).err(),
            Some(InviteError::UsernameMismatch)
        );
        b.reserve(t, &claim("A", "alice", 1001), HOST, 1001)
            .unwrap();
        b.confirm(t, "A", HOST, 1001).unwrap();
        assert!(!b.username_reserved("alice", 1001, None).unwrap());
        assert_eq!(b.backend().count(Space::Names), 0);
        // Expired invites stop reserving.
        b.create(account(Some("zed")), 1000).unwrap();
        assert!(b.username_reserved("zed", 1100, None).unwrap());
        assert!(!b.username_reserved("zed", 1101, None).unwrap());
    }

    #[test]
    fn revocation_is_immediate_and_frees_the_name() {
        let b = book();
        let c = b.create(account(Some("alice")), 1000).unwrap();
        let t = c.token.expose();
        b.validate(t, None, HOST, 1001).unwrap();
        b.reserve(t, &claim("A", "alice", 1001), HOST, 1001)
            .unwrap();
        b.revoke(t, 1002).unwrap();
        assert_eq!(
            b.validate(t, None, HOST, 1003).err(),
            Some(InviteError::TokenRevoked)
        );
        assert_eq!(
            b.reserve(t, &claim("A", "alice", 1001), HOST, 1003).err(),
            Some(InviteError::TokenRevoked)
        );
        assert!(!b.username_reserved("alice", 1003, None).unwrap());
        let r = b.listed(&c.hash, 1003).unwrap().unwrap();
        assert_eq!(r.status(1003), Status::Revoked);
    }

    #[test]
    fn contact_invites_check_the_inviter_and_are_spent_once() {
        let b = book();
        let c = b.create(contact("romeo", false), 1000).unwrap();
        let t = c.token.expose();
        assert_eq!(
            c.uri(),
            format!("xmpp:romeo@example.com?roster;preauth={t}")
        );
        assert_eq!(
            b.validate(t, None, HOST, 1001).err(),
            Some(InviteError::TokenInvalid)
        );
        assert_eq!(
            b.validate(t, Some("juliet"), HOST, 1001).err(),
            Some(InviteError::TokenInvalid)
        );
        b.validate(t, Some("romeo"), HOST, 1001).unwrap();
        b.redeem(t, Some("romeo"), HOST, 1001).unwrap();
        assert_eq!(
            b.validate(t, Some("romeo"), HOST, 1001).err(),
            Some(InviteError::TokenUsed)
        );
        // A revoked contact invite no longer approves anything.
        let c2 = b.create(contact("romeo", true), 1000).unwrap();
        let t2 = c2.token.expose();
        assert!(c2.uri().ends_with(";ibr=y"));
        b.revoke(t2, 1001).unwrap();
        assert_eq!(
            b.validate(t2, Some("romeo"), HOST, 1001).err(),
            Some(InviteError::TokenRevoked)
        );
    }

    #[test]
    fn corrupt_records_are_logged_without_secrets_and_refused() {
        let b = book();
        let c = b.create(account(None), 1000).unwrap();
        b.backend()
            .set_raw(Space::Invites, &c.hash.key(), "{not json");
        assert_eq!(
            b.validate(c.token.expose(), None, HOST, 1001).err(),
            Some(InviteError::TokenInvalid)
        );
        let logs = b.backend().logs.borrow();
        let (level, line) = logs.last().unwrap();
        assert_eq!(*level, Level::Warn);
        assert!(line.contains(&c.token.hash().short_id()));
        assert!(!line.contains(c.token.expose()));
    }

    #[test]
    fn storage_failures_change_nothing_and_say_internal_server_error() {
        let b = book();
        let c = b.create(account(None), 1000).unwrap();
        let t = c.token.expose().to_owned();
        let before = everything_stored(&b);
        // Fail at every step of reserve/confirm: nothing may end up redeemed.
        for fail_at in 0..4 {
            b.backend().fail_after.set(Some(fail_at));
            let r = b
                .reserve(&t, &claim("A", "alice", 1001), HOST, 1001)
                .and_then(|_| b.confirm(&t, "A", HOST, 1001));
            b.backend().fail_after.set(None);
            if let Err(e) = r {
                assert_eq!(e, InviteError::Storage);
                let _ = b.release(&t, "A", 1001);
                assert_eq!(everything_stored(&b), before, "fail_at={fail_at}");
            } else {
                break;
            }
        }
        b.backend().fail_after.set(Some(0));
        assert_eq!(
            b.create(account(None), 1000).err(),
            Some(InviteError::Storage)
        );
        b.backend().fail_after.set(None);
    }

    #[test]
    fn create_rolls_back_if_the_name_cannot_be_reserved() {
        let b = book();
        b.backend().fail_after.set(Some(2)); // save ok, index read ok, index write fails
        assert_eq!(
            b.create(account(Some("alice")), 1000).err(),
            Some(InviteError::Storage)
        );
        b.backend().fail_after.set(None);
        assert_eq!(b.backend().count(Space::Invites), 0);
    }

    #[test]
    fn a_failed_undo_is_logged_by_the_invites_id() {
        let b = book();
        // save ok, index read ok, index write fails, and so does the undo.
        b.backend().fail_after.set(Some(2));
        b.backend().stay_failed.set(true);
        assert_eq!(
            b.create(account(Some("alice")), 1000).err(),
            Some(InviteError::Storage)
        );
        b.backend().fail_after.set(None);
        // The invite stays, without its reservation; the log says which one.
        let slots = b.backend().slots.borrow();
        let ((space, key), _) = slots.iter().next().unwrap();
        assert_eq!((*space, slots.len()), (Space::Invites, 1));
        let logs = b.backend().logs.borrow();
        let (level, line) = logs.last().unwrap();
        assert_eq!(*level, Level::Error);
        assert_eq!(
            line,
            &format!(
                "could not remove invite {} after failing to reserve its username: storage \
                 error: injected failure; it stays stored without the reservation",
                &key[54..]
            )
        );
    }

    #[test]
    fn legacy_invites_import_under_their_hash() {
        let b = book();
        let legacy = LegacyInvite {
            kind: InviteKind::Register,
            jid: String::from("alice@example.com"),
            allow_registration: true,
            additional_data: Some(serde_json::json!({"allow_reset": "alice"})),
            created_at: 900,
            expires: 2000,
            reusable: false,
            contact_of: None,
            landing_page: None,
        };
        assert!(b
            .import_legacy("OldToken16chars_", legacy.clone(), 1000)
            .unwrap());
        assert!(!b
            .import_legacy("OldToken16chars_", legacy.clone(), 1000)
            .unwrap());
        let (_, found) = b.validate("OldToken16chars_", None, HOST, 1000).unwrap();
        assert_eq!(found.record.reset.as_deref(), Some("alice"));
        assert_eq!(found.record.username.as_deref(), Some("alice"));
        let mut expired = legacy;
        expired.expires = 999;
        assert!(!b.import_legacy("Another16chars__", expired, 1000).unwrap());
        assert!(!everything_stored(&b).contains("OldToken16chars_"));
    }

    #[test]
    fn prune_removes_only_invites_that_are_over_and_old_enough() {
        let b = book();
        let pending = b.create(account(None), 1000).unwrap();
        let used = b.create(account(None), 1000).unwrap();
        b.redeem(used.token.expose(), None, HOST, 1010).unwrap();
        let revoked = b.create(account(Some("alice")), 1000).unwrap();
        b.revoke_key(&revoked.hash, 1020).unwrap();
        let expired = b.create(account(Some("bob")), 900).unwrap(); // expires at 1000
        let corrupt = b.create(account(None), 1000).unwrap();
        b.backend()
            .set_raw(Space::Invites, &corrupt.hash.key(), "junk");

        // Within the retention time nothing goes.
        for c in [&pending, &used, &revoked, &expired, &corrupt] {
            assert!(!b.prune(&c.hash, 1050, 100).unwrap());
        }
        // Later, what is over goes; pending and corrupt records stay.
        assert!(!b.prune(&pending.hash, 1100, 0).unwrap());
        assert!(b.prune(&used.hash, 1110, 100).unwrap());
        assert!(b.prune(&revoked.hash, 1120, 100).unwrap());
        assert!(b.prune(&expired.hash, 1100, 100).unwrap());
        assert!(!b.prune(&corrupt.hash, 5000, 0).unwrap());
        assert_eq!(b.backend().count(Space::Invites), 2);
        // The expired invite's name reservation went with it.
        assert_eq!(b.backend().count(Space::Names), 0);
    }

    #[test]
    fn revoke_by_key_matches_revoke_by_token() {
        let b = book();
        let c = b.create(account(None), 1000).unwrap();
        let found = b.revoke_key(&c.hash, 1001).unwrap();
        assert_eq!(found.record.status(1001), Status::Revoked);
        assert_eq!(
            b.revoke_key(&TokenHash::from_key(&"0".repeat(64)).unwrap(), 1001)
                .err(),
            Some(InviteError::TokenInvalid)
        );
    }

    /// Replays a registration's storage writes and "crashes" after every prefix of them
    /// (the in-memory `Invites` is dropped; only what was written survives), then restarts
    /// past the reservation lease and lets another client try the same invite.
    /// Invariants: (1) at most `uses` accounts from the invite, ever; (2) a registration
    /// that failed leaves the remaining uses unchanged; (3) a revoked invite yields nothing.
    #[test]
    fn crash_after_every_write_of_a_registration_keeps_the_invariants() {
        for max_uses in [1u32, 2] {
            for revoke_after_restart in [false, true] {
                for crash_at in 0..=4 {
                    let backend = MemoryBackend::new();
                    let mut spec = account(None);
                    spec.max_uses = Some(max_uses);
                    let token = {
                        let book = Book::new(&backend, HOST);
                        book.create(spec, 1000).unwrap().token.expose().to_owned()
                    };
                    let mut created_by_invite = 0;
                    let mut step = 0;
                    let mut first_failed = true;
                    {
                        // The first registration, cut short after `crash_at` steps.
                        let book = Book::new(&backend, HOST);
                        let claim = claim("A", "alice", 1001);
                        let mut run = || -> Option<()> {
                            step += 1;
                            if step > crash_at {
                                return None;
                            }
                            book.reserve(&token, &claim, HOST, 1001).ok()?;
                            step += 1;
                            if step > crash_at {
                                return None;
                            }
                            backend.accounts.borrow_mut().insert(String::from("alice"));
                            created_by_invite += 1;
                            step += 1;
                            if step > crash_at {
                                return None;
                            }
                            book.confirm(&token, "A", HOST, 1001).ok()?;
                            first_failed = false;
                            Some(())
                        };
                        let _ = run();
                    }
                    // Restart well after the lease; maybe an admin revokes the invite.
                    let book = Book::new(&backend, HOST);
                    // Past the lease (1061), before expiry (1100).
                    let later = 1090;
                    if revoke_after_restart {
                        // Refused, and nothing changed, if the invite is used up already.
                        match book.revoke(&token, later) {
                            Ok(_) | Err(InviteError::TokenUsed) => {}
                            Err(e) => panic!("revoke: {e}"),
                        }
                    }
                    // Others try until the invite refuses.
                    let mut others = 0;
                    for i in 0..5 {
                        let holder = format!("B{i}");
                        let user = format!("bob{i}");
                        let c = claim(&holder, &user, later);
                        if book.reserve(&token, &c, HOST, later).is_ok() {
                            backend.accounts.borrow_mut().insert(user.clone());
                            book.confirm(&token, &holder, HOST, later).unwrap();
                            others += 1;
                        }
                    }
                    let total = created_by_invite + others;
                    let case = format!(
                        "max_uses={max_uses} revoke={revoke_after_restart} crash_at={crash_at}"
                    );
                    // (1)
                    assert!(total <= max_uses, "{case}: {total} accounts");
                    // (3)
                    if revoke_after_restart {
                        assert_eq!(others, 0, "{case}");
                    } else {
                        // (2): whatever the first attempt did not create is still there.
                        assert_eq!(
                            total, max_uses,
                            "{case}: uses lost (first failed: {first_failed})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_use_a_crash_left_held_shows_as_spent_in_listings_and_is_written_back() {
        let b = book();
        let c = b.create(account(None), 1000).unwrap();
        let t = c.token.expose();
        let mut held = claim("A", "alice", 1001);
        held.lease_until = 1010;
        b.reserve(t, &held, HOST, 1001).unwrap();
        // The server died after creating alice, before confirming.
        b.backend()
            .accounts
            .borrow_mut()
            .insert(String::from("alice"));

        let listed = b.listed(&c.hash, 1011).unwrap().unwrap();
        assert_eq!(listed.status(1011), Status::Used);
        assert_eq!(
            b.validate(t, None, HOST, 1011).err(),
            Some(InviteError::TokenUsed)
        );
        // validate wrote the settled record: it reads as used with no accounts to ask.
        b.backend().accounts.borrow_mut().clear();
        let stored = b.listed(&c.hash, 1012).unwrap().unwrap();
        assert_eq!(stored.status(1012), Status::Used);
    }

    #[test]
    fn listed_skips_corrupt_entries() {
        let b = book();
        let c = b.create(account(None), 1000).unwrap();
        assert!(b.listed(&c.hash, 1000).unwrap().is_some());
        b.backend().set_raw(Space::Invites, &c.hash.key(), "[]");
        assert!(b.listed(&c.hash, 1000).unwrap().is_none());
    }

    #[test]
    fn an_invite_acts_only_for_its_own_host() {
        let b = book();
        let c = b.create(account(None), 1000).unwrap();
        let t = c.token.expose();
        let other = "b.example.com";
        assert_eq!(
            b.validate(t, None, other, 1001).err(),
            Some(InviteError::WrongHost)
        );
        // Refused before the lookup: an unknown token gets the same answer.
        assert_eq!(
            b.validate("unknown", None, other, 1001).err(),
            Some(InviteError::WrongHost)
        );
        assert_eq!(
            b.reserve(t, &claim("A", "alice", 1001), other, 1001).err(),
            Some(InviteError::WrongHost)
        );
        assert_eq!(
            b.redeem(t, None, other, 1001).err(),
            Some(InviteError::WrongHost)
        );
        // Held on its own host, the use cannot be confirmed for an account elsewhere.
        b.reserve(t, &claim("A", "alice", 1001), HOST, 1001)
            .unwrap();
        assert_eq!(
            b.confirm(t, "A", other, 1002).err(),
            Some(InviteError::WrongHost)
        );
        assert_eq!(b.load(&c.hash).unwrap().uses, 0);
        b.release(t, "A", 1002).unwrap();
        // Nothing was spent: it still works where it belongs (host names are case-blind).
        b.reserve(t, &claim("B", "bob", 1003), "Example.COM", 1003)
            .unwrap();
        b.confirm(t, "B", HOST, 1003).unwrap();
        assert_eq!(b.listed(&c.hash, 1003).unwrap().unwrap().uses, 1);
        assert!(b
            .backend()
            .logs
            .borrow()
            .iter()
            .all(|(_, m)| !m.contains(t)));
    }

    #[test]
    fn a_record_made_for_another_host_is_refused_and_logged() {
        let backend = MemoryBackend::new();
        let theirs = Book::new(&backend, "b.example.com");
        let mut spec = contact("romeo", true);
        spec.jid = String::from("romeo@b.example.com");
        let c = theirs.create(spec, 1000).unwrap();
        let t = c.token.expose();
        // The same stores opened for example.com (data copied between hosts).
        let ours = Book::new(&backend, HOST);
        assert_eq!(
            ours.validate(t, None, HOST, 1001).err(),
            Some(InviteError::WrongHost)
        );
        assert_eq!(
            ours.validate(t, Some("romeo"), HOST, 1001).err(),
            Some(InviteError::WrongHost)
        );
        let logs = backend.logs.borrow();
        let (level, line) = logs.last().unwrap();
        assert_eq!(*level, Level::Warn);
        assert!(line.contains("names b.example.com"), "{line}");
        assert!(!line.contains(t));
    }

    #[test]
    fn legacy_tokens_of_any_shape_import_and_expired_ones_are_dropped() {
        let b = book();
        let legacy = |expires| LegacyInvite {
            kind: InviteKind::Register,
            jid: String::from(HOST),
            allow_registration: true,
            additional_data: None,
            created_at: 900,
            expires,
            reusable: false,
            contact_of: None,
            landing_page: None,
        };
        // Prosody's store takes any string as a token; it is found again by its hash.
        for token in ["with space", "plus+slash/eq=", "caf\u{e9};#"] {
            assert!(
                b.import_legacy(token, legacy(2000), 1000).unwrap(),
                "{token:?}"
            );
            let (_, found) = b.validate(token, None, HOST, 1000).unwrap();
            assert_eq!(found.hash, Token::parse(token).unwrap().hash());
        }
        // Expired entries are dropped whatever their token, with no error to repeat.
        let huge = "x".repeat(crate::token::MAX_TOKEN_LEN + 1);
        for token in ["", huge.as_str(), "with space 2"] {
            assert_eq!(b.import_legacy(token, legacy(999), 1000), Ok(false));
        }
        // A live entry whose token could never be presented is refused (and not kept).
        assert_eq!(
            b.import_legacy(&huge, legacy(2000), 1000).err(),
            Some(InviteError::TokenInvalid)
        );
    }

    fn sealed_book(key: u8) -> Book<MemoryBackend> {
        book().with_token_storage(TokenStorage::SealedWithKey([key; 32]))
    }

    #[test]
    fn sealed_tokens_are_stored_only_sealed_and_open_for_listings() {
        let b = sealed_book(7);
        let c = b.create(account(None), 1000).unwrap();
        let t = c.token.expose();
        assert!(!everything_stored(&b).contains(t));
        let stored = b.load(&c.hash).unwrap();
        assert!(stored.sealed_token.is_some());
        assert_eq!(b.token_of(&c.hash, &stored).unwrap().expose(), t);
        // Hash only: nothing to open.
        let h = book();
        let c2 = h.create(account(None), 1000).unwrap();
        let stored2 = h.load(&c2.hash).unwrap();
        assert!(stored2.sealed_token.is_none());
        assert!(h.token_of(&c2.hash, &stored2).is_none());
    }

    #[test]
    fn another_key_or_a_moved_seal_shows_no_link_and_warns_once() {
        let backend = MemoryBackend::new();
        let first =
            Book::new(&backend, HOST).with_token_storage(TokenStorage::SealedWithKey([1; 32]));
        let a = first.create(account(None), 1000).unwrap();
        let b2 = first.create(account(None), 1000).unwrap();
        // The key file was replaced: the invites still work, their links are gone.
        let second =
            Book::new(&backend, HOST).with_token_storage(TokenStorage::SealedWithKey([2; 32]));
        for c in [&a, &b2] {
            let r = second.load(&c.hash).unwrap();
            assert!(second.token_of(&c.hash, &r).is_none());
            assert!(second.validate(c.token.expose(), None, HOST, 1001).is_ok());
        }
        let warnings = backend
            .logs
            .borrow()
            .iter()
            .filter(|(l, m)| *l == Level::Warn && m.contains("invite_token_key_file"))
            .count();
        assert_eq!(warnings, 1);
        // A sealed token copied into another record does not open there.
        let mut moved = first.load(&b2.hash).unwrap();
        moved.sealed_token = first.load(&a.hash).unwrap().sealed_token;
        assert!(first.token_of(&b2.hash, &moved).is_none());
        assert!(first
            .token_of(&a.hash, &first.load(&a.hash).unwrap())
            .is_some());
    }

    #[test]
    fn handlers_changes_are_stored_and_the_landing_page_without_its_token() {
        let b = sealed_book(3);
        let mut c = b.prepare(account(None), 1000);
        // Not stored before store_created: invite-created handlers run in between.
        assert_eq!(b.backend().count(Space::Invites), 0);
        let url = format!("https://example.com/invite?{}&x=1", c.token.expose());
        c.record.landing_page = Some(LandingPage::without_token(&url, &c.token));
        c.record.additional_data = Some(serde_json::json!({"groups": ["default"]}));
        b.store_created(&mut c).unwrap();
        assert!(!everything_stored(&b).contains(c.token.expose()));
        let (_, found) = b.validate(c.token.expose(), None, HOST, 1001).unwrap();
        assert_eq!(found.record.landing_page.unwrap().with_token(&c.token), url);
        assert_eq!(
            found.record.additional_data,
            Some(serde_json::json!({"groups": ["default"]}))
        );
    }

    #[test]
    fn a_negative_ttl_makes_an_invite_that_is_already_expired() {
        let b = book();
        let mut spec = account(None);
        spec.ttl = -3600;
        let c = b.create(spec, 10_000).unwrap();
        assert_eq!(c.record.expires, 6400);
        assert_eq!(
            b.validate(c.token.expose(), None, HOST, 10_000).err(),
            Some(InviteError::TokenExpired)
        );
    }

    #[test]
    fn imported_legacy_invites_are_sealed_with_their_landing_page() {
        let b = sealed_book(9);
        let token = "Legacy+Token/16=";
        let legacy = LegacyInvite {
            kind: InviteKind::Register,
            jid: String::from(HOST),
            allow_registration: true,
            additional_data: None,
            created_at: 900,
            expires: 2000,
            reusable: false,
            contact_of: None,
            landing_page: Some(String::from(
                "https://example.com/invites_page?Legacy%2BToken%2F16%3D",
            )),
        };
        assert!(b.import_legacy(token, legacy, 1000).unwrap());
        assert!(!everything_stored(&b).contains(token));
        assert!(!everything_stored(&b).contains("Legacy%2BToken"));
        let hash = Token::parse(token).unwrap().hash();
        let record = b.load(&hash).unwrap();
        let opened = b.token_of(&hash, &record).unwrap();
        assert_eq!(opened.expose(), token);
        assert_eq!(
            record.landing_page.unwrap().with_token(&opened),
            "https://example.com/invites_page?Legacy%2BToken%2F16%3D"
        );
    }

    #[test]
    fn revoking_refuses_what_is_over_and_names_why() {
        let b = book();
        let used = b.create(account(None), 1000).unwrap();
        b.redeem(used.token.expose(), None, HOST, 1001).unwrap();
        assert_eq!(
            b.revoke(used.token.expose(), 1002).err(),
            Some(InviteError::TokenUsed)
        );
        let live = b.create(account(None), 1000).unwrap();
        b.revoke(live.token.expose(), 1002).unwrap();
        assert_eq!(
            b.revoke_key(&live.hash, 1003).err(),
            Some(InviteError::TokenRevoked)
        );
        let old = b.create(account(None), 1000).unwrap();
        assert_eq!(
            b.revoke(old.token.expose(), 1101).err(),
            Some(InviteError::TokenExpired)
        );
        // Nothing was written for the refusals.
        assert_eq!(b.load(&used.hash).unwrap().state, StoredState::Used);
        assert_eq!(b.load(&old.hash).unwrap().state, StoredState::Pending);
    }

    #[test]
    fn an_admin_reference_resolves_by_token_handle_or_unique_id() {
        let b = book();
        let a = b.create(account(None), 1000).unwrap();
        let c = b.create(account(None), 1000).unwrap();
        let (a_key, c_key) = (a.hash.key(), c.hash.key());
        // The store may hold owners that are no key: they are no invites.
        let keys: Vec<String> = vec![format!("zz{}", &a_key[54..]), a_key.clone(), c_key.clone()];
        let walk = |visit: &mut dyn FnMut(&str) -> bool| {
            for k in &keys {
                if !visit(k) {
                    break;
                }
            }
            Ok(())
        };
        assert_eq!(b.resolve(a.token.expose(), walk).unwrap(), a.hash);
        assert_eq!(b.resolve(&a_key, walk).unwrap(), a.hash);
        assert_eq!(b.resolve(&a_key.to_uppercase(), walk).unwrap(), a.hash);
        assert_eq!(b.resolve(&a_key[54..], walk).unwrap(), a.hash);
        assert_eq!(
            b.resolve("nope", walk).err(),
            Some(InviteError::NoSuchInvite)
        );
        assert_eq!(
            b.resolve(&"f".repeat(64), walk).err(),
            Some(InviteError::NoSuchInvite)
        );
        // A suffix both keys share (the empty-ish one) is ambiguous.
        let common = a_key
            .chars()
            .rev()
            .zip(c_key.chars().rev())
            .take_while(|(x, y)| x == y)
            .count();
        if common < 4 {
            let walk_same = |visit: &mut dyn FnMut(&str) -> bool| {
                for k in [format!("0000{}", &a_key[4..]), a_key.clone()] {
                    if !visit(&k) {
                        break;
                    }
                }
                Ok(())
            };
            assert_eq!(
                b.resolve(&a_key[50..], walk_same).err(),
                Some(InviteError::AmbiguousId)
            );
        }
    }

    #[test]
    fn a_failed_registration_whose_account_exists_spends_its_use() {
        let b = book();
        let c = b.create(account(None), 1000).unwrap();
        let t = c.token.expose();
        b.reserve(t, &claim("A", "alice", 1001), HOST, 1001)
            .unwrap();
        // Prosody 13 kept the account although registration failed.
        b.backend()
            .accounts
            .borrow_mut()
            .insert(String::from("alice"));
        assert_eq!(b.release(t, "A", 1002).unwrap(), Released::Spent);
        assert_eq!(b.load(&c.hash).unwrap().uses, 1);
        assert_eq!(b.release(t, "A", 1003).unwrap(), Released::Nothing);
        // A reset invite never spends on release: the account existed before.
        let mut spec = account(Some("bob"));
        spec.reset = Some(String::from("bob"));
        let r = b.create(spec, 1000).unwrap();
        let mut bob = claim("R", "bob", 1001);
        bob.account_exists = true;
        b.backend()
            .accounts
            .borrow_mut()
            .insert(String::from("bob"));
        b.reserve(r.token.expose(), &bob, HOST, 1001).unwrap();
        assert_eq!(
            b.release(r.token.expose(), "R", 1002).unwrap(),
            Released::GivenBack
        );
        assert_eq!(b.load(&r.hash).unwrap().uses, 0);
    }

    #[test]
    fn a_key_file_others_can_read_is_warned_about_once() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("invites-keymode-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k");
        std::fs::write(&path, format!("{}\n", "ab".repeat(32))).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let b = book().with_token_storage(TokenStorage::Sealed(path.clone()));
        b.create(account(None), 1000).unwrap();
        b.create(account(None), 1000).unwrap();
        let warned = b
            .backend()
            .logs
            .borrow()
            .iter()
            .filter(|(l, m)| *l == Level::Warn && m.contains("mode 0600"))
            .count();
        assert_eq!(warned, 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn by(creator: &str, source: &str) -> Provenance {
        Provenance {
            creator: Some(creator.to_owned()),
            source: Some(source.to_owned()),
            note: None,
        }
    }

    fn register(b: &Book<MemoryBackend>, token: &str, holder: &str, username: &str, now: i64) {
        b.reserve(token, &claim(holder, username, now), HOST, now)
            .unwrap();
        b.backend()
            .accounts
            .borrow_mut()
            .insert(username.to_owned());
        b.confirm(token, holder, HOST, now).unwrap();
    }

    fn uses(n: u32) -> Edit {
        Edit {
            max_uses: std::num::NonZeroU32::new(n),
            ..Edit::default()
        }
    }

    #[test]
    fn provenance_and_note_are_stored_with_the_invite() {
        let b = book();
        let c = b
            .create_with(
                account(None),
                Provenance {
                    creator: Some(String::from("alice")),
                    source: Some(String::from("admin@example.com/res")),
                    note: Some(String::from("for the choir")),
                },
                1000,
            )
            .unwrap();
        let stored = b.load(&c.hash).unwrap();
        assert_eq!(stored.creator.as_deref(), Some("alice"));
        assert_eq!(stored.source.as_deref(), Some("admin@example.com/res"));
        assert_eq!(stored.note.as_deref(), Some("for the choir"));
        // Without provenance, as before.
        let plain = b.create(account(None), 1000).unwrap();
        let stored = b.load(&plain.hash).unwrap();
        assert_eq!(
            (stored.creator, stored.source, stored.note),
            (None, None, None)
        );
    }

    #[test]
    fn every_use_is_kept_as_a_redemption_with_its_account() {
        let b = book();
        let mut spec = account(None);
        spec.max_uses = Some(3);
        let c = b.create(spec, 1000).unwrap();
        let t = c.token.expose();
        register(&b, t, "A", "alice", 1001);
        b.redeem_account(t, None, Some("bob"), HOST, 1002).unwrap();
        b.redeem(t, None, HOST, 1003).unwrap();
        let r = b.load(&c.hash).unwrap();
        let got: Vec<_> = r
            .redemptions
            .iter()
            .map(|x| (x.account.as_deref(), x.at, x.reset))
            .collect();
        assert_eq!(
            got,
            [
                (Some("alice"), 1001, false),
                (Some("bob"), 1002, false),
                (None, 1003, false)
            ]
        );
    }

    #[test]
    fn a_registration_enters_the_child_and_its_creator_in_the_tree() {
        let b = book();
        let mut spec = account(None);
        spec.max_uses = Some(2);
        let c = b.create_with(spec, by("alice", "shell"), 1000).unwrap();
        let t = c.token.expose();
        register(&b, t, "A", "bob", 1001);
        register(&b, t, "C", "carol", 1002);
        let bob = b.account("bob").unwrap().unwrap();
        assert_eq!(bob.by.as_deref(), Some("alice"));
        assert_eq!(bob.source.as_deref(), Some("shell"));
        assert_eq!(bob.invite, Some(c.hash.short_id()));
        assert_eq!((bob.registered, bob.deleted), (Some(1001), None));
        // The creator had no entry: it has one now.
        let alice = b.account("alice").unwrap().unwrap();
        assert_eq!(alice.invited, ["bob", "carol"]);
        assert_eq!(alice.registered, None);
        // Entering the same redemptions again changes nothing.
        let before = everything_stored(&b);
        let r = b.load(&c.hash).unwrap();
        b.enter_redeemed(&c.hash, &r, 0);
        assert_eq!(everything_stored(&b), before);
        assert!(b.account("nobody").unwrap().is_none());
    }

    #[test]
    fn a_crash_between_account_and_confirm_still_enters_the_tree_once() {
        let b = book();
        let c = b
            .create_with(account(None), by("alice", "prosodyctl"), 1000)
            .unwrap();
        let t = c.token.expose();
        let mut held = claim("A", "bob", 1001);
        held.lease_until = 1010;
        b.reserve(t, &held, HOST, 1001).unwrap();
        b.backend()
            .accounts
            .borrow_mut()
            .insert(String::from("bob"));
        // Past the lease, a lookup settles the use as spent, for bob.
        assert_eq!(
            b.validate(t, None, HOST, 1011).err(),
            Some(InviteError::TokenUsed)
        );
        assert_eq!(b.account("bob").unwrap().unwrap().registered, Some(1011));
        assert_eq!(b.account("alice").unwrap().unwrap().invited, ["bob"]);
        // Looking again changes nothing.
        let before = everything_stored(&b);
        let _ = b.validate(t, None, HOST, 1012);
        let _ = b.listed(&c.hash, 1012);
        assert_eq!(everything_stored(&b), before);
    }

    #[test]
    fn resets_and_subscriptions_enter_nobody_in_the_tree() {
        let b = book();
        let mut spec = account(Some("bob"));
        spec.reset = Some(String::from("bob"));
        let r = b.create_with(spec, by("admin", "shell"), 1000).unwrap();
        b.redeem_account(r.token.expose(), None, Some("mallory"), HOST, 1001)
            .unwrap();
        let stored = b.load(&r.hash).unwrap();
        assert_eq!(stored.redemptions[0].account.as_deref(), Some("bob"));
        assert!(stored.redemptions[0].reset);
        let c = b.create(contact("romeo", true), 1000).unwrap();
        b.redeem_account(
            c.token.expose(),
            Some("romeo"),
            Some("juliet@elsewhere.example"),
            HOST,
            1001,
        )
        .unwrap();
        assert_eq!(b.backend().count(Space::Accounts), 0);
        // A contact invite that registers an account: made by (or, before creators, for)
        // the user it is a contact of.
        let c2 = b.create(contact("romeo", true), 1000).unwrap();
        b.redeem_account(c2.token.expose(), None, Some("juliet"), HOST, 1002)
            .unwrap();
        assert_eq!(
            b.account("juliet").unwrap().unwrap().by.as_deref(),
            Some("romeo")
        );
        assert_eq!(b.account("romeo").unwrap().unwrap().invited, ["juliet"]);
    }

    #[test]
    fn an_entry_outlives_the_purge_of_its_accounts_records() {
        // Prosody purges every record kept under a deleted account's username, in every
        // store, after user-deleted: the tree's entry is kept under another key.
        let b = book();
        b.account_registered("bob", 1000).unwrap();
        b.account_deleted("bob", 1001).unwrap();
        b.backend().put(Space::Accounts, "bob", None).unwrap();
        let bob = b.account("bob").unwrap().unwrap();
        assert_eq!((bob.registered, bob.deleted), (Some(1000), Some(1001)));
        let mut keys = Vec::new();
        b.backend()
            .each_key(Space::Accounts, &mut |key| {
                keys.push(key.to_owned());
                true
            })
            .unwrap();
        assert_eq!(keys, ["account:bob"]);
        assert_eq!(crate::record::username_of_entry_key(&keys[0]), Some("bob"));
        assert_eq!(crate::record::username_of_entry_key("bob"), None);
    }

    #[test]
    fn accounts_registered_without_an_invite_and_deleted_ones() {
        let b = book();
        b.account_registered("dave", 1000).unwrap();
        let dave = b.account("dave").unwrap().unwrap();
        assert_eq!((dave.by, dave.registered), (None, Some(1000)));
        // Registered already: left as it is.
        b.account_registered("dave", 2000).unwrap();
        assert_eq!(b.account("dave").unwrap().unwrap().registered, Some(1000));
        // An invited account keeps its provenance.
        let c = b
            .create_with(account(None), by("alice", "shell"), 1000)
            .unwrap();
        register(&b, c.token.expose(), "A", "bob", 1001);
        b.account_registered("bob", 1002).unwrap();
        assert_eq!(
            b.account("bob").unwrap().unwrap().by.as_deref(),
            Some("alice")
        );
        // Deleted, then registered again without an invite: a new account of that name.
        assert_eq!(b.account_deleted("bob", 1003).unwrap(), 0);
        let bob = b.account("bob").unwrap().unwrap();
        assert_eq!(
            (bob.deleted, bob.by.as_deref()),
            (Some(1003), Some("alice"))
        );
        b.account_registered("bob", 1004).unwrap();
        let bob = b.account("bob").unwrap().unwrap();
        assert_eq!(
            (bob.by, bob.registered, bob.deleted),
            (None, Some(1004), None)
        );
        // An account the tree never knew stays visible once deleted.
        b.account_deleted("ghost", 1005).unwrap();
        assert_eq!(b.account("ghost").unwrap().unwrap().deleted, Some(1005));
    }

    #[test]
    fn deleting_an_account_revokes_the_invites_still_to_be_had_that_are_its() {
        let b = book();
        let pending = b
            .create_with(account(None), by("alice", "shell"), 1000)
            .unwrap();
        let reserved = b
            .create_with(account(None), by("alice", "shell"), 1000)
            .unwrap();
        b.reserve(
            reserved.token.expose(),
            &claim("R", "zoe", 1001),
            HOST,
            1001,
        )
        .unwrap();
        let used = b
            .create_with(account(None), by("alice", "shell"), 1000)
            .unwrap();
        b.redeem(used.token.expose(), None, HOST, 1001).unwrap();
        let expired = b
            .create_with(account(None), by("alice", "shell"), 900)
            .unwrap();
        let contact_to_alice = b.create(contact("alice", true), 1000).unwrap();
        let bobs = b
            .create_with(account(None), by("bob", "shell"), 1000)
            .unwrap();
        let nobodys = b.create(account(None), 1000).unwrap();
        b.backend().set_raw(Space::Invites, "not-a-key", "junk");

        assert_eq!(b.revoke_by("carol", 1002).unwrap(), 0);
        assert_eq!(b.account_deleted("alice", 1002).unwrap(), 3);
        for c in [&pending, &reserved, &contact_to_alice] {
            assert_eq!(b.load(&c.hash).unwrap().state, StoredState::Revoked);
        }
        assert_eq!(b.load(&used.hash).unwrap().state, StoredState::Used);
        // Expired, not counted, but revoked all the same: no edit gives it new life.
        assert_eq!(b.load(&expired.hash).unwrap().state, StoredState::Revoked);
        assert_eq!(
            b.edit(
                &expired.hash,
                &Edit {
                    expires: Some(5000),
                    ..Edit::default()
                },
                1003
            )
            .err(),
            Some(InviteError::TokenRevoked)
        );
        for c in [&bobs, &nobodys] {
            assert_eq!(b.load(&c.hash).unwrap().state, StoredState::Pending);
        }
        assert_eq!(b.account("alice").unwrap().unwrap().deleted, Some(1002));
        // Again: nothing more to revoke.
        assert_eq!(b.revoke_by("alice", 1003).unwrap(), 0);
        assert_eq!(b.revoke_by("bob", 1003).unwrap(), 1);
    }

    #[test]
    fn revoke_by_goes_on_past_a_failure_and_reports_it() {
        let b = book();
        for _ in 0..3 {
            b.create_with(account(None), by("alice", "shell"), 1000)
                .unwrap();
        }
        // One storage operation on the way fails (the first revocation's write).
        b.backend().fail_after.set(Some(2));
        assert_eq!(b.revoke_by("alice", 1001).err(), Some(InviteError::Storage));
        b.backend().fail_after.set(None);
        // The others were revoked; what is left, is now.
        assert_eq!(b.revoke_by("alice", 1002).unwrap(), 1);
    }

    #[test]
    fn edit_to_three_uses_while_registrations_are_under_way() {
        let b = book();
        let c = b.create(account(None), 1000).unwrap();
        let t = c.token.expose();
        b.reserve(t, &claim("A", "alice", 1001), HOST, 1001)
            .unwrap();
        let edited = b.edit(&c.hash, &uses(3), 1001).unwrap();
        assert_eq!(edited.record.use_limit(), Some(3));
        b.reserve(t, &claim("B", "bob", 1001), HOST, 1001).unwrap();
        b.reserve(t, &claim("C", "carol", 1001), HOST, 1001)
            .unwrap();
        assert_eq!(
            b.reserve(t, &claim("D", "dave", 1001), HOST, 1001).err(),
            Some(InviteError::TokenUsed)
        );
        for h in ["A", "B", "C"] {
            b.confirm(t, h, HOST, 1002).unwrap();
        }
        let r = b.listed(&c.hash, 1002).unwrap().unwrap();
        assert_eq!((r.uses, r.status(1002)), (3, Status::Used));
        assert_eq!(r.redemptions.len(), 3);
        assert_eq!(
            b.edit(&c.hash, &uses(5), 1003).err(),
            Some(InviteError::TokenUsed)
        );
    }

    #[test]
    fn edit_below_what_is_held_is_refused_and_writes_nothing() {
        let b = book();
        let mut spec = account(None);
        spec.max_uses = Some(3);
        let c = b.create(spec, 1000).unwrap();
        let t = c.token.expose();
        register(&b, t, "A", "alice", 1001);
        b.reserve(t, &claim("B", "bob", 1001), HOST, 1001).unwrap();
        let before = everything_stored(&b);
        assert_eq!(
            b.edit(&c.hash, &uses(1), 1002).err(),
            Some(InviteError::UsesBelowTaken)
        );
        assert_eq!(everything_stored(&b), before);
        b.edit(&c.hash, &uses(2), 1002).unwrap();
        b.confirm(t, "B", HOST, 1003).unwrap();
        let r = b.listed(&c.hash, 1003).unwrap().unwrap();
        assert_eq!(r.status(1003), Status::Used);
    }

    #[test]
    fn edit_revives_an_expired_invite_and_its_name_but_nothing_used_or_revoked() {
        let b = book();
        let c = b.create(account(Some("alice")), 1000).unwrap();
        assert!(!b.username_reserved("alice", 1101, None).unwrap());
        let note = Edit {
            note: Some(Some(String::from("again"))),
            ..Edit::default()
        };
        assert_eq!(
            b.edit(&c.hash, &note, 1101).err(),
            Some(InviteError::TokenExpired)
        );
        let past = Edit {
            expires: Some(1101),
            ..Edit::default()
        };
        assert_eq!(
            b.edit(&c.hash, &past, 1101).err(),
            Some(InviteError::InvalidExpiry)
        );
        let later = Edit {
            expires: Some(5000),
            note: Some(Some(String::from("again"))),
            ..Edit::default()
        };
        let revived = b.edit(&c.hash, &later, 1101).unwrap();
        assert_eq!(revived.record.status(1101), Status::Pending);
        assert_eq!(revived.record.note.as_deref(), Some("again"));
        // The name is held again, until the new expiry.
        assert!(b.username_reserved("alice", 4000, None).unwrap());
        assert_eq!(
            b.edit(&c.hash, &uses(2), 1102).err(),
            Some(InviteError::SingleAccount)
        );
        register(&b, c.token.expose(), "A", "alice", 1102);
        assert_eq!(
            b.edit(&c.hash, &later, 6000).err(),
            Some(InviteError::TokenUsed)
        );
        let r = b.create(account(None), 1000).unwrap();
        b.revoke_key(&r.hash, 1001).unwrap();
        assert_eq!(
            b.edit(&r.hash, &later, 1200).err(),
            Some(InviteError::TokenRevoked)
        );
        assert_eq!(
            b.edit(&TokenHash::from_key(&"0".repeat(64)).unwrap(), &note, 1000)
                .err(),
            Some(InviteError::NoSuchInvite)
        );
        // Clearing the note.
        let live = b.create(account(None), 1000).unwrap();
        b.edit(&live.hash, &note, 1001).unwrap();
        let cleared = Edit {
            note: Some(None),
            ..Edit::default()
        };
        assert_eq!(
            b.edit(&live.hash, &cleared, 1001).unwrap().record.note,
            None
        );
    }

    #[test]
    fn charge_counts_an_accounts_invites_against_its_quota() {
        let b = book();
        let day = 86_400;
        let rule = Rule {
            limit: Some(2),
            period: Some(day),
            wait: Some(3600),
        };
        // An account the tree does not know is an old one.
        b.charge("old", &rule, 1000).unwrap();
        b.charge("old", &rule, 1001).unwrap();
        assert_eq!(
            b.charge("old", &rule, 1002).err(),
            Some(Refusal {
                error: InviteError::QuotaExceeded,
                retry_at: Some(1000 + day)
            })
        );
        b.charge("old", &rule, 1000 + day).unwrap();
        // A new account waits.
        let c = b.create(account(None), 1000).unwrap();
        register(&b, c.token.expose(), "A", "newbie", 1000);
        assert_eq!(
            b.charge("newbie", &rule, 1000 + 59 * 60).err(),
            Some(Refusal {
                error: InviteError::TooSoon,
                retry_at: Some(1000 + 3600)
            })
        );
        b.charge("newbie", &rule, 1000 + 3600).unwrap();
        assert_eq!(b.account("newbie").unwrap().unwrap().created, [4600]);
        // Storage that fails refuses, and says why.
        b.backend().fail_after.set(Some(0));
        assert_eq!(
            b.charge("old", &Rule::default(), 5000).err(),
            Some(Refusal {
                error: InviteError::Storage,
                retry_at: None
            })
        );
        b.backend().fail_after.set(None);
    }

    #[test]
    fn the_tree_and_quotas_log_no_token() {
        let b = book();
        let c = b
            .create_with(account(None), by("alice", "shell"), 1000)
            .unwrap();
        let t = c.token.expose().to_owned();
        b.reserve(&t, &claim("A", "bob", 1001), HOST, 1001).unwrap();
        // confirm: the tree's entry read (the invite is as reserve stored it), then the
        // entry cannot be written, nor anything after: the use stays held (and is spent
        // when its lease lapses: bob exists).
        b.backend().fail_after.set(Some(1));
        b.backend().stay_failed.set(true);
        assert_eq!(
            b.confirm(&t, "A", HOST, 1001).err(),
            Some(InviteError::Storage)
        );
        let _ = b.account_deleted("alice", 1002);
        b.backend().fail_after.set(None);
        b.backend().stay_failed.set(false);
        assert!(b.account("bob").unwrap().is_none());
        let logs = b.backend().logs.borrow();
        assert!(logs
            .iter()
            .any(|(l, m)| *l == Level::Error && m.contains("account entry of bob")));
        assert!(logs.iter().all(|(_, m)| !m.contains(&t)));
        assert!(!everything_stored(&b).contains(&t));
    }

    #[test]
    fn a_registration_confirmed_while_its_invite_is_revoked_still_counts_its_use() {
        let (a, b, c, token) = alice_reserving_on_one_of_two_processes(1061);
        a.backend()
            .accounts
            .borrow_mut()
            .insert(String::from("alice"));
        // Revoked in another process while confirm writes alice's entry: the revocation
        // keeps the reservation, and alice's entry spends it.
        let t2 = token.clone();
        meanwhile(&a, &b, move |b2| {
            b2.revoke(&t2, 1002).unwrap();
        });
        a.confirm_account(&token, "A", Some("alice"), HOST, 1002)
            .unwrap();
        let r = a.listed(&c.hash, 1003).unwrap().unwrap();
        assert_eq!((r.uses, r.state), (1, StoredState::Revoked));
        assert_eq!(r.redemptions[0].account.as_deref(), Some("alice"));
    }

    #[test]
    fn a_registration_writes_its_invite_once_and_its_entry_spends_the_use() {
        let b = book();
        let c = b.create(account(None), 1000).unwrap();
        let t = c.token.expose();
        b.reserve(t, &claim("A", "alice", 1001), HOST, 1001)
            .unwrap();
        let reserved = b.backend().raw(Space::Invites, &c.hash.key());
        b.backend()
            .accounts
            .borrow_mut()
            .insert(String::from("alice"));
        assert_eq!(b.confirm(t, "A", HOST, 1002).unwrap().record.uses, 1);
        // Not written again: alice's entry in the tree is what spends the use.
        assert_eq!(b.backend().raw(Space::Invites, &c.hash.key()), reserved);
        let r = b.listed(&c.hash, 1002).unwrap().unwrap();
        assert_eq!((r.uses, r.status(1002)), (1, Status::Used));
        assert_eq!(r.redemptions[0].account.as_deref(), Some("alice"));
        assert_eq!(r.redemptions[0].at, 1002);
        assert_eq!(
            b.reserve(t, &claim("B", "bob", 1003), HOST, 1003).err(),
            Some(InviteError::TokenUsed)
        );
        // Deleted before her reservation's lease ran out (1061): the use stays spent.
        b.backend().accounts.borrow_mut().remove("alice");
        b.account_deleted("alice", 1004).unwrap();
        assert_eq!(
            b.reserve(t, &claim("C", "carol", 1070), HOST, 1070).err(),
            Some(InviteError::TokenUsed)
        );
        assert_eq!(b.listed(&c.hash, 1070).unwrap().unwrap().uses, 1);
    }

    #[test]
    fn a_confirmation_with_time_left_on_its_lease_reads_no_invite() {
        let b = book();
        let c = b.create(account(None), 1000).unwrap();
        let t = c.token.expose();
        b.reserve(t, &claim("A", "alice", 1001), HOST, 1001)
            .unwrap();
        b.backend().invite_reads.set(0);
        assert_eq!(b.confirm(t, "A", HOST, 1002).unwrap().record.uses, 1);
        assert_eq!(b.backend().invite_reads.get(), 0);
        assert_eq!(
            b.account("alice").unwrap().unwrap().invite,
            Some(c.hash.short_id())
        );
        let r = b.listed(&c.hash, 1003).unwrap().unwrap();
        assert_eq!((r.uses, r.status(1003)), (1, Status::Used));
        // A process that did not make the reservation (restarted since) reads it once.
        let d = b.create(account(None), 1000).unwrap();
        let u = d.token.expose();
        b.reserve(u, &claim("B", "bob", 1001), HOST, 1001).unwrap();
        let restarted = Book::new(b.backend().sharing(), HOST);
        assert_eq!(
            restarted.confirm(u, "B", HOST, 1002).unwrap().record.uses,
            1
        );
        assert_eq!(restarted.backend().invite_reads.get(), 1);
        // A released reservation is forgotten.
        let e = b.create(account(None), 1000).unwrap();
        let v = e.token.expose();
        b.reserve(v, &claim("C", "carol", 1001), HOST, 1001)
            .unwrap();
        assert!(b.held.borrow().contains_key("C"));
        b.release(v, "C", 1002).unwrap();
        assert!(!b.held.borrow().contains_key("C"));
        // Registrations that never said how they ended (a failed web registration) are
        // dropped once their lease has run out, when room is needed.
        let f = b.create(account(None), 1000).unwrap();
        let w = f.token.expose();
        for i in 0..HELD_MAX {
            let holder = format!("stale{i}");
            let mut held = b.held.borrow_mut();
            let mut r = f.record.clone();
            r.reservations.push(crate::record::Reservation {
                holder: holder.clone(),
                until: 1061,
                username: Some(format!("u{i}")),
                at: Some(1001),
            });
            held.insert(holder, (f.hash, r));
        }
        b.reserve(w, &claim("D", "dave", 1100), HOST, 1100).unwrap();
        let held = b.held.borrow();
        assert!(held.contains_key("D") && !held.contains_key("stale0"));
    }

    #[test]
    fn a_late_confirmation_reads_the_invite_after_the_entry() {
        // Reserved at 1001. Confirmed more than FAST_CONFIRM after the reservation (1012,
        // held until 1061), or with less than LAPSE_MARGIN left (1007, held until 1036).
        // Another process, whose clock is past the lease, settles it as lapsed (alice's
        // account not there yet: the use is given back) while alice's entry is being
        // written, and allows more uses.
        for (until, confirmed_at) in [(1061, 1012), (1036, 1007)] {
            let (a, b, c, token) = alice_reserving_on_one_of_two_processes(until);
            let hash = c.hash;
            meanwhile(&a, &b, move |b2| {
                b2.edit(&hash, &uses(3), until + 1).unwrap();
            });
            a.backend().invite_reads.set(0);
            a.confirm_account(&token, "A", Some("alice"), HOST, confirmed_at)
                .unwrap();
            assert!(a.backend().invite_reads.get() >= 1, "{confirmed_at}");
            // The entry could not spend it: the invite was written with alice's use.
            let r = a.listed(&c.hash, confirmed_at + 1).unwrap().unwrap();
            assert_eq!(r.uses, 1, "{confirmed_at}");
            assert_eq!(r.redemptions[0].account.as_deref(), Some("alice"));
        }
    }

    // Two processes on one database: two books over backends sharing one map. Each test
    // runs the second process's operation between the first one's read and its write
    // (`MemoryBackend::interleave`), the moment a per-process lock cannot cover.

    /// A second book over the same storage, and a place for the answer of what it runs.
    fn other_process(b: &Book<MemoryBackend>) -> Rc<Book<MemoryBackend>> {
        Rc::new(Book::new(b.backend().sharing(), HOST))
    }

    /// An invite of `a` for `uses` accounts, and its token.
    fn with_uses(a: &Book<MemoryBackend>, uses: u32) -> (Created, String) {
        let mut spec = account(None);
        spec.max_uses = Some(uses);
        let c = a.create(spec, 1000).unwrap();
        let token = c.token.expose().to_owned();
        (c, token)
    }

    /// Runs `f` on `b` in `a`'s next change, between its read and its write.
    fn meanwhile(
        a: &Book<MemoryBackend>,
        b: &Rc<Book<MemoryBackend>>,
        f: impl FnOnce(&Book<MemoryBackend>) + 'static,
    ) {
        let b = Rc::clone(b);
        a.backend().interleave(move || f(&b));
    }

    /// Two processes; the first holds a use of a new invite for alice, reserved at 1001
    /// and held until `until`.
    fn alice_reserving_on_one_of_two_processes(
        until: i64,
    ) -> (
        Book<MemoryBackend>,
        Rc<Book<MemoryBackend>>,
        Created,
        String,
    ) {
        let a = book();
        let b = other_process(&a);
        let c = a.create(account(None), 1000).unwrap();
        let token = c.token.expose().to_owned();
        let mut alice = claim("A", "alice", 1001);
        alice.lease_until = until;
        a.reserve(&token, &alice, HOST, 1001).unwrap();
        (a, b, c, token)
    }

    fn uses_of(b: &Book<MemoryBackend>, hash: &TokenHash) -> (u32, usize) {
        let r = b.listed(hash, 2000).unwrap().unwrap();
        (r.uses, r.reservations.len())
    }

    #[test]
    fn two_processes_reserving_the_last_use_one_account() {
        let a = book();
        let b = other_process(&a);
        let c = a.create(account(None), 1000).unwrap();
        let token = c.token.expose().to_owned();
        let t2 = token.clone();
        let other = Rc::new(RefCell::new(None));
        let answer = Rc::clone(&other);
        meanwhile(&a, &b, move |b2| {
            let r = b2.reserve(&t2, &claim("B", "bob", 1001), HOST, 1002);
            let r = r.and_then(|_| b2.confirm(&t2, "B", HOST, 1002));
            *answer.borrow_mut() = Some(r.map(|_| ()));
        });
        // A read the invite pending; B took the use before A wrote.
        assert_eq!(
            a.reserve(&token, &claim("A", "alice", 1001), HOST, 1002)
                .err(),
            Some(InviteError::TokenUsed)
        );
        assert_eq!(other.borrow().clone(), Some(Ok(())));
        assert_eq!(a.backend().conflicts.get(), 1);
        assert_eq!(uses_of(&a, &c.hash), (1, 0));
    }

    #[test]
    fn two_processes_redeeming_a_multi_use_invite_count_every_use() {
        let a = book();
        let b = other_process(&a);
        let (c, token) = with_uses(&a, 2);
        let t2 = token.clone();
        meanwhile(&a, &b, move |b2| {
            b2.redeem(&t2, None, HOST, 1002).unwrap();
        });
        a.redeem(&token, None, HOST, 1002).unwrap();
        // Both uses counted: neither write lost the other's.
        assert_eq!(uses_of(&a, &c.hash), (2, 0));
        assert_eq!(
            b.redeem(&token, None, HOST, 1003).err(),
            Some(InviteError::TokenUsed)
        );
    }

    #[test]
    fn a_revocation_made_between_a_read_and_a_write_is_never_lost() {
        let a = book();
        let b = other_process(&a);
        let (c, token) = with_uses(&a, 5);
        let t2 = token.clone();
        meanwhile(&a, &b, move |b2| {
            b2.revoke(&t2, 1002).unwrap();
        });
        // A's registration read the invite pending; the revocation wins.
        assert_eq!(
            a.reserve(&token, &claim("A", "alice", 1001), HOST, 1002)
                .err(),
            Some(InviteError::TokenRevoked)
        );
        let r = a.listed(&c.hash, 1003).unwrap().unwrap();
        assert_eq!(r.state, StoredState::Revoked);
        assert!(r.reservations.is_empty());
        // And the other way round: a revocation that read before a use was redeemed.
        let c = a.create(account(None), 1000).unwrap();
        let token = c.token.expose().to_owned();
        let t2 = token.clone();
        meanwhile(&a, &b, move |b2| {
            b2.redeem(&t2, None, HOST, 1002).unwrap();
        });
        assert_eq!(a.revoke(&token, 1002).err(), Some(InviteError::TokenUsed));
        assert_eq!(uses_of(&a, &c.hash), (1, 0));
    }

    #[test]
    fn an_edit_keeps_a_reservation_made_in_between() {
        let a = book();
        let b = other_process(&a);
        let c = a.create(account(None), 1000).unwrap();
        let token = c.token.expose().to_owned();
        let t2 = token.clone();
        meanwhile(&a, &b, move |b2| {
            b2.reserve(&t2, &claim("B", "bob", 1001), HOST, 1002)
                .unwrap();
        });
        a.edit(&c.hash, &uses(3), 1002).unwrap();
        let r = a.listed(&c.hash, 1003).unwrap().unwrap();
        assert_eq!(r.use_limit(), Some(3));
        assert_eq!(r.reservations.len(), 1);
        b.confirm(&token, "B", HOST, 1004).unwrap();
        assert_eq!(uses_of(&a, &c.hash), (1, 0));
    }

    #[test]
    fn prune_leaves_an_invite_revived_in_between() {
        let a = book();
        let b = other_process(&a);
        let c = a.create(account(None), 1000).unwrap();
        let hash = c.hash;
        meanwhile(&a, &b, move |b2| {
            let edit = Edit {
                expires: Some(5000),
                max_uses: None,
                note: None,
            };
            b2.edit(&hash, &edit, 1200).unwrap();
        });
        // Expired at 1100: prune read it over, the edit gave it until 5000 first.
        assert!(!a.prune(&c.hash, 1200, 0).unwrap());
        a.validate(c.token.expose(), None, HOST, 1201).unwrap();
    }

    #[test]
    fn two_processes_releasing_and_confirming_one_reservation_each() {
        let a = book();
        let b = other_process(&a);
        let (c, token) = with_uses(&a, 2);
        a.reserve(&token, &claim("A", "alice", 1001), HOST, 1001)
            .unwrap();
        b.reserve(&token, &claim("B", "bob", 1001), HOST, 1001)
            .unwrap();
        let t2 = token.clone();
        meanwhile(&a, &b, move |b2| {
            b2.confirm(&t2, "B", HOST, 1002).unwrap();
        });
        assert_eq!(a.release(&token, "A", 1002).unwrap(), Released::GivenBack);
        // Bob's use is spent, Alice's given back: one use left.
        assert_eq!(uses_of(&a, &c.hash), (1, 0));
        a.redeem(&token, None, HOST, 1003).unwrap();
    }

    #[test]
    fn an_invite_imported_by_two_processes_is_stored_once() {
        let a = book();
        let b = other_process(&a);
        let legacy = || LegacyInvite {
            kind: InviteKind::Register,
            jid: String::from("example.com"),
            allow_registration: true,
            additional_data: None,
            created_at: 900,
            expires: 5000,
            reusable: false,
            contact_of: None,
            landing_page: None,
        };
        let token = "abcdefghijklmnopqrstuvwx";
        let invite = legacy();
        meanwhile(&a, &b, move |b2| {
            assert!(b2.import_legacy(token, invite, 1000).unwrap());
        });
        assert!(!a.import_legacy(token, legacy(), 1000).unwrap());
        assert_eq!(a.backend().count(Space::Invites), 1);
    }

    #[test]
    fn two_processes_charging_one_quota_count_both() {
        let a = book();
        let b = other_process(&a);
        let rule = Rule {
            limit: Some(1),
            period: None,
            wait: None,
        };
        meanwhile(&a, &b, move |b2| {
            b2.charge("alice", &rule, 1000).unwrap();
        });
        assert_eq!(
            a.charge("alice", &rule, 1000).err().map(|r| r.error),
            Some(InviteError::QuotaExceeded)
        );
        assert_eq!(a.account("alice").unwrap().unwrap().created, [1000]);
    }

    #[test]
    fn an_invite_changed_at_every_attempt_is_left_alone_and_said() {
        let a = book();
        let c = a.create(account(None), 1000).unwrap();
        let key = c.hash.key();
        let before = a.backend().raw(Space::Invites, &key).unwrap();
        let slots = Rc::clone(&a.backend().slots);
        let mut n = 0;
        // Another writer changes the slot each time, between our read and our write.
        let written = a.backend().update(Space::Invites, &key, &mut |_| {
            n += 1;
            slots
                .borrow_mut()
                .insert((Space::Invites, key.clone()), format!("{before}{n}"));
            Write::Put(String::from("ours"))
        });
        assert_eq!(written, Err(StoreError::Contended));
        assert_eq!(n, crate::error::UPDATE_ATTEMPTS);
        assert_ne!(
            a.backend().raw(Space::Invites, &key).as_deref(),
            Some("ours")
        );
    }
}
