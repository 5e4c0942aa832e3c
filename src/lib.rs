//! prosody-invites: the invite core behind our drop-in `mod_invites` for Prosody.
//!
//! - `token.rs`: the secret token and the hash that stands for it everywhere else
//! - `record.rs`: the storage layout and record encoding
//! - `seal.rs`: tokens sealed at rest (AEAD) and the key file
//! - `state.rs`: the invite state machine (pending → reserved → used / expired / revoked)
//! - `store.rs`: the narrow storage interface the Lua shim provides
//! - `invites.rs`: operations as read-check-write sequences over one record
//! - `uri.rs`: XMPP invite URIs
//! - `throttle.rs`: preauth guessing limits per IP, in bounded memory
//! - `duration.rs`: `30m`, `12h`, `3d`, `2w`
//! - `lua.rs`: the only file that speaks Lua

pub mod duration;
pub mod error;
pub mod invites;
pub mod lua;
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
