//! prosody-invites: the invite core behind our drop-in `mod_invites` for Prosody.
//!
//! Glossary (one name per concept, in Rust, Lua and the docs alike):
//! - **book**: the invites of one virtual host over its storage ([`book::Book`]; in Lua the
//!   object `core.new{…}` returns).
//! - **invite**: one stored record ([`record::InviteRecord`]) granting an account
//!   (`register`) or a contact (`roster`), for one or more uses.
//! - **token**: the secret an invitee presents ([`token::Token`]). Handed out once, inside
//!   the invite's URI; never stored, logged or shown in plain.
//! - **hash**: the token's SHA-256 ([`token::TokenHash`]); what names an invite inside the
//!   core. **key**: the hash as 64 hex digits, made only at the edge: the owner of the
//!   record in the store, and what Lua is given. **handle**: a key standing in a listing's
//!   `token` field where the token cannot be shown (`invite_token_storage = "hash"`).
//! - **id**: the last 10 hex digits of the key; the non-secret name in logs and listings.
//! - **reserve / confirm / release**: a registration holds one use (reserve, at
//!   `user-registering`), then redeems it (confirm, at `user-registered`) or gives it back
//!   (release, when registration fails).
//! - **redeem**: spend one use of an invite: by confirm, or at once (`Book::redeem`, the
//!   Lua method `use`). A use once redeemed is spent.
//! - **seal**: keep a token encrypted inside its record ([`seal::Sealer`]) so listings can
//!   show the link again; lookups never need it.
//! - **creator**: the local account (a username, without host) on whose behalf an invite
//!   was made. **source**: where it was made, as free text (`prosodyctl`, `shell`, an
//!   admin's JID). Both are its provenance ([`book::Provenance`]).
//! - **redemption**: one redeemed use as the invite keeps it ([`record::Redemption`]): the
//!   account it created (or whose password it reset) and when.
//! - **note**: an administrator's free text on an invite, set at creation or by **edit**
//!   (new expiry, number of uses, note: [`state::Edit`]).
//! - **account entry**: what the book keeps of one local account ([`record::AccountEntry`]):
//!   who invited it, with which invite, when it registered (and was deleted), whom it
//!   invited. The entries together are the **account tree** (the invite tree).
//! - **quota**: how many invites an account may make per period, and how long a new account
//!   waits before it may make any ([`quota::Rule`]); **charge** checks and counts one.
//!
//! Files:
//! - `token.rs`: the secret token and the hash that stands for it everywhere else
//! - `record.rs`: the storage layout and record encoding
//! - `seal.rs`: tokens sealed at rest (AEAD) and the key file
//! - `state.rs`: the invite state machine (pending → reserved → used / expired / revoked),
//!   redemptions and edits
//! - `store.rs`: the narrow storage interface the Lua shim provides
//! - `book.rs`: the book's operations, as read-check-write sequences over one record
//! - `quota.rs`: how many invites an account may make, and when
//! - `uri.rs`: XMPP invite URIs
//! - `throttle.rs`: preauth guessing limits per IP, in bounded memory
//! - `duration.rs`: `30m`, `12h`, `3d`, `2w`
//! - `lua.rs`: the only file that speaks Lua

pub mod book;
pub mod duration;
pub mod error;
pub mod lua;
pub mod quota;
pub mod record;
pub mod seal;
pub mod state;
pub mod store;
pub mod throttle;
pub mod token;
pub mod uri;

/// Entry point Lua calls on `package.loadlib(path, "luaopen_prosody_invites")`.
#[cfg(feature = "module")]
#[mlua::lua_module]
fn prosody_invites(lua: &mlua::Lua) -> mlua::Result<mlua::Table> {
    lua::exports(lua)
}
