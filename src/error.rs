//! The expected ways an invite operation can fail.
//!
//! Each variant has a stable hyphenated name (its `Display`), reused from Prosody's
//! vocabulary where Prosody has one. The Lua shim maps these names to stanza errors
//! in one table; nothing here carries a token.

use std::fmt;

/// Why an invite operation did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum InviteError {
    /// No token was supplied.
    NoToken,
    /// The token is malformed, unknown, or not valid for this kind of use.
    TokenInvalid,
    /// The invite passed its expiry time.
    TokenExpired,
    /// Every use of the invite has been spent (or is being spent right now).
    TokenUsed,
    /// An administrator revoked the invite.
    TokenRevoked,
    /// The invite is bound to another username.
    UsernameMismatch,
    /// The username is held for a pending invite.
    UsernameReserved,
    /// The requested account already exists (and the invite is not a reset).
    UsernameTaken,
    /// A password-reset invite names an account that does not exist.
    AccountNotFound,
    /// The invite belongs to another virtual host than the one acting on it (a stream
    /// opened to one host that presents, or registers with, another host's invite).
    WrongHost,
    /// An admin named an invite (by id or token) that is not stored.
    NoSuchInvite,
    /// An admin named an invite by an id that more than one invite ends with.
    AmbiguousId,
    /// Storage failed or returned something unreadable; nothing was changed.
    Storage,
    /// An edit asked for an expiry time that is not in the future.
    InvalidExpiry,
    /// An edit asked for fewer uses than are redeemed or held by registrations in flight.
    UsesBelowTaken,
    /// The invite can make one account only (bound to a username, a password reset, or a
    /// contact invite): it cannot be given more uses.
    SingleAccount,
    /// The account made as many invites as its quota allows in the period.
    QuotaExceeded,
    /// The account is too new to make invites yet.
    TooSoon,
}

impl InviteError {
    /// Every variant, for checks that must cover them all.
    pub const ALL: [InviteError; 18] = [
        InviteError::NoToken,
        InviteError::TokenInvalid,
        InviteError::TokenExpired,
        InviteError::TokenUsed,
        InviteError::TokenRevoked,
        InviteError::UsernameMismatch,
        InviteError::UsernameReserved,
        InviteError::UsernameTaken,
        InviteError::AccountNotFound,
        InviteError::WrongHost,
        InviteError::NoSuchInvite,
        InviteError::AmbiguousId,
        InviteError::Storage,
        InviteError::InvalidExpiry,
        InviteError::UsesBelowTaken,
        InviteError::SingleAccount,
        InviteError::QuotaExceeded,
        InviteError::TooSoon,
    ];

    /// The stable name handed to Lua as the second return value.
    pub fn name(&self) -> &'static str {
        match self {
            InviteError::NoToken => "no-token",
            InviteError::TokenInvalid => "token-invalid",
            InviteError::TokenExpired => "token-expired",
            InviteError::TokenUsed => "token-used",
            InviteError::TokenRevoked => "token-revoked",
            InviteError::UsernameMismatch => "username-mismatch",
            InviteError::UsernameReserved => "username-reserved",
            InviteError::UsernameTaken => "username-taken",
            InviteError::AccountNotFound => "account-not-found",
            InviteError::WrongHost => "wrong-host",
            InviteError::NoSuchInvite => "no-such-invite",
            InviteError::AmbiguousId => "ambiguous-id",
            InviteError::Storage => "internal-server-error",
            InviteError::InvalidExpiry => "invalid-expiry",
            InviteError::UsesBelowTaken => "uses-below-taken",
            InviteError::SingleAccount => "single-account",
            InviteError::QuotaExceeded => "quota-exceeded",
            InviteError::TooSoon => "too-soon",
        }
    }
}

impl fmt::Display for InviteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::error::Error for InviteError {}

/// How often `Backend::update` reads again after another writer got in first.
pub const UPDATE_ATTEMPTS: usize = 32;

/// A failure reported by the storage backend (Prosody's store API).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The backend reported an error; the text is the backend's own and holds no token.
    Backend(String),
    /// The backend returned a value of a shape we never write.
    Malformed(String),
    /// Other writers changed the slot every time between our read and our write.
    Contended,
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Backend(e) => write!(f, "storage error: {e}"),
            StoreError::Malformed(e) => write!(f, "malformed stored value: {e}"),
            StoreError::Contended => write!(
                f,
                "changed by other writers at each of {UPDATE_ATTEMPTS} attempts"
            ),
        }
    }
}

impl std::error::Error for StoreError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable_and_hyphenated() {
        for e in InviteError::ALL {
            let name = e.to_string();
            assert!(name.chars().all(|c| c.is_ascii_lowercase() || c == '-'));
        }
        assert_eq!(InviteError::Storage.name(), "internal-server-error");
    }

    #[test]
    fn every_name_is_distinct() {
        let mut names: Vec<&str> = InviteError::ALL.iter().map(InviteError::name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), InviteError::ALL.len());
        assert_eq!(InviteError::UsesBelowTaken.name(), "uses-below-taken");
    }
}
