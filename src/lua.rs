//! The Lua adapter: converts between Lua values and the core, and nothing else.
//!
//! Exports (`require`d through `package.loadlib`):
//! - `new{ host = "example.com", invites = store, names = store, log = function(level, message),
//!   token_storage = "sealed" | "hash", key_file = path }` → book for that virtual host, where
//!   the stores are Prosody keyval stores (`module:open_store(...)`); tokens are sealed with
//!   the key in `key_file` (made on first use), or kept as hashes only.
//! - book methods `create`, `get`, `reserve`, `confirm`, `release`, `use`, `revoke`,
//!   `revoke_key`, `prune`, `username_reserved`, `listed`, `import_legacy` (see
//!   `lua/mod_invites/mod_invites.lua`). `get`, `reserve`, `confirm` and `use` take the
//!   host the caller acts for (the stream's or the new account's), and give
//!   `nil, "wrong-host"` unless it is the book's.
//!
//! Wrong argument types raise (API misuse); expected failures return `nil, "error-name"`.
//! No Rust panic crosses into Lua: every method runs under `catch_unwind` and reports a
//! panic as `nil, "internal-server-error"`.

use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};

use mlua::{
    DeserializeOptions, Function, IntoLuaMulti, Lua, LuaSerdeExt, MultiValue, SerializeOptions,
    Table, UserData, UserDataMethods, Value, WeakLua,
};

use crate::duration::parse_duration;
use crate::error::{InviteError, StoreError};
use crate::invites::{record_uri, Found, Invites, LegacyInvite, NewInvite, TokenStorage};
use crate::record::{InviteKind, InviteRecord, LandingPage};
use crate::state::Claim;
use crate::store::{Backend, Level, Space};
use crate::throttle::Throttle;
use crate::token::{short_id_of_key, Token};

/// Prosody keyval stores and a log function, as handed over by the shim.
pub struct LuaBackend {
    lua: WeakLua,
    invites: Table,
    names: Table,
    log: Option<Function>,
    account_exists: Option<Function>,
}

impl LuaBackend {
    fn store(&self, space: Space) -> &Table {
        match space {
            Space::Invites => &self.invites,
            Space::Names => &self.names,
        }
    }
}

fn lua_error_text(e: &mlua::Error) -> String {
    // Only the first line: tracebacks add nothing an admin can act on.
    e.to_string().lines().next().unwrap_or("").to_owned()
}

impl Backend for LuaBackend {
    fn get(&self, space: Space, owner: &str) -> Result<Option<String>, StoreError> {
        let store = self.store(space);
        let get: Function = store
            .get("get")
            .map_err(|e| StoreError::Backend(lua_error_text(&e)))?;
        let (value, err): (Value, Value) = get
            .call((store.clone(), owner))
            .map_err(|e| StoreError::Backend(lua_error_text(&e)))?;
        match value {
            Value::Nil => match err {
                Value::Nil => Ok(None),
                other => Err(StoreError::Backend(describe(&other))),
            },
            Value::Table(t) => match t.raw_get::<Value>("record") {
                Ok(Value::String(s)) => match s.to_str() {
                    Ok(s) => Ok(Some(s.to_owned())),
                    Err(_) => Err(StoreError::Malformed(String::from("record is not UTF-8"))),
                },
                Ok(other) => Err(StoreError::Malformed(format!(
                    "record field is {}",
                    other.type_name()
                ))),
                Err(e) => Err(StoreError::Malformed(lua_error_text(&e))),
            },
            other => Err(StoreError::Malformed(format!(
                "stored value is {}",
                other.type_name()
            ))),
        }
    }

    fn put(&self, space: Space, owner: &str, value: Option<&str>) -> Result<(), StoreError> {
        let store = self.store(space);
        let set: Function = store
            .get("set")
            .map_err(|e| StoreError::Backend(lua_error_text(&e)))?;
        let lua = self
            .lua
            .try_upgrade()
            .ok_or_else(|| StoreError::Backend(String::from("Lua state is gone")))?;
        let data = match value {
            Some(v) => {
                let t = lua
                    .create_table()
                    .map_err(|e| StoreError::Backend(lua_error_text(&e)))?;
                t.raw_set("record", v)
                    .map_err(|e| StoreError::Backend(lua_error_text(&e)))?;
                Value::Table(t)
            }
            None => Value::Nil,
        };
        let (ok, err): (Value, Value) = set
            .call((store.clone(), owner, data))
            .map_err(|e| StoreError::Backend(lua_error_text(&e)))?;
        match ok {
            Value::Nil | Value::Boolean(false) => Err(StoreError::Backend(describe(&err))),
            _ => Ok(()),
        }
    }

    fn log(&self, level: Level, message: &str) {
        if let Some(log) = &self.log {
            let _ = log.call::<()>((level.as_str(), message));
        }
    }

    fn account_exists(&self, username: &str) -> Result<bool, StoreError> {
        match &self.account_exists {
            None => Ok(false),
            Some(f) => match f.call::<Value>(username) {
                Ok(Value::Boolean(b)) => Ok(b),
                Ok(Value::Nil) => Ok(false),
                Ok(other) => Ok(!matches!(other, Value::Boolean(false))),
                Err(e) => Err(StoreError::Backend(lua_error_text(&e))),
            },
        }
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => s.to_string_lossy().lines().next().unwrap_or("").to_owned(),
        Value::Nil => String::from("unknown error"),
        other => format!("error value of type {}", other.type_name()),
    }
}

/// The userdata handed to Lua.
pub struct Book(Invites<LuaBackend>);

// ---------------------------------------------------------------------------------------
// Argument checking: mlua would coerce quietly, so every boundary value is checked here.

fn bad_argument(n: usize, method: &str, expected: &str, got: &Value) -> mlua::Error {
    mlua::Error::RuntimeError(format!(
        "bad argument #{n} to '{method}' ({expected} expected, got {})",
        got.type_name()
    ))
}

fn integer(v: &Value, n: usize, method: &str) -> mlua::Result<i64> {
    match v {
        Value::Integer(i) => Ok(*i),
        Value::Number(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(*f as i64),
        other => Err(bad_argument(n, method, "integer", other)),
    }
}

fn opt_string(v: Value, n: usize, method: &str) -> mlua::Result<Option<String>> {
    match v {
        Value::Nil => Ok(None),
        Value::String(s) => Ok(Some(s.to_str()?.to_owned())),
        other => Err(bad_argument(n, method, "string or nil", &other)),
    }
}

fn string(v: Value, n: usize, method: &str) -> mlua::Result<String> {
    match v {
        Value::String(s) => Ok(s.to_str()?.to_owned()),
        other => Err(bad_argument(n, method, "string", &other)),
    }
}

fn opt_field_string(t: &Table, name: &str, method: &str) -> mlua::Result<Option<String>> {
    match t.raw_get::<Value>(name)? {
        Value::Nil => Ok(None),
        Value::String(s) => Ok(Some(s.to_str()?.to_owned())),
        other => Err(bad_field(name, method, "string or nil", &other)),
    }
}

fn opt_field_bool(t: &Table, name: &str, method: &str) -> mlua::Result<bool> {
    match t.raw_get::<Value>(name)? {
        Value::Nil => Ok(false),
        Value::Boolean(b) => Ok(b),
        other => Err(bad_field(name, method, "boolean or nil", &other)),
    }
}

fn field_integer(t: &Table, name: &str, method: &str) -> mlua::Result<i64> {
    let v: Value = t.raw_get(name)?;
    integer(&v, 0, method).map_err(|_| bad_field(name, method, "integer", &v))
}

fn bad_field(name: &str, method: &str, expected: &str, got: &Value) -> mlua::Error {
    mlua::Error::RuntimeError(format!(
        "bad field '{name}' in argument to '{method}' ({expected} expected, got {})",
        got.type_name()
    ))
}

fn kind(t: &Table, method: &str) -> mlua::Result<InviteKind> {
    match opt_field_string(t, "type", method)?.as_deref() {
        Some("register") => Ok(InviteKind::Register),
        Some("roster") => Ok(InviteKind::Roster),
        _ => Err(mlua::Error::RuntimeError(format!(
            "bad field 'type' in argument to '{method}' (\"register\" or \"roster\" expected)"
        ))),
    }
}

/// Plain data is kept as JSON inside the invite's record, which serde_json reads back to
/// 128 levels only; and converting it recurses once per level, so a deep enough table would
/// overflow the stack before any check of ours. Prosody's own data is two levels deep.
const MAX_DATA_DEPTH: usize = 32;
/// Values in one piece of plain data, a shared table counted each time it is reached (as
/// converting copies it each time), so that shared or cyclic tables keep the check cheap.
const MAX_DATA_VALUES: usize = 10_000;

/// Whether `v` nests at most `depth` tables deep, within the remaining `budget` of values.
fn data_within(v: &Value, depth: usize, budget: &mut usize) -> mlua::Result<bool> {
    let Some(left) = budget.checked_sub(1) else {
        return Ok(false);
    };
    *budget = left;
    let Value::Table(t) = v else {
        return Ok(true);
    };
    if depth == 0 {
        return Ok(false);
    }
    for pair in t.pairs::<Value, Value>() {
        let (key, value) = pair?;
        if !data_within(&key, depth - 1, budget)? || !data_within(&value, depth - 1, budget)? {
            return Ok(false);
        }
    }
    Ok(true)
}

fn json_of(
    lua: &Lua,
    v: Value,
    what: &str,
    method: &str,
) -> mlua::Result<Option<serde_json::Value>> {
    if v.is_nil() {
        return Ok(None);
    }
    let mut budget = MAX_DATA_VALUES;
    if !data_within(&v, MAX_DATA_DEPTH, &mut budget)? {
        return Err(mlua::Error::RuntimeError(format!(
            "bad field '{what}' in argument to '{method}' (plain data expected: \
             at most {MAX_DATA_DEPTH} tables deep and {MAX_DATA_VALUES} values)"
        )));
    }
    let options = DeserializeOptions::new().deny_unsupported_types(true);
    lua.from_value_with::<serde_json::Value>(v, options)
        .map(Some)
        .map_err(|e| {
            mlua::Error::RuntimeError(format!(
                "bad field '{what}' in argument to '{method}' (plain data expected: {e})"
            ))
        })
}

// ---------------------------------------------------------------------------------------
// Results back to Lua.

fn failure(lua: &Lua, e: InviteError) -> mlua::Result<MultiValue> {
    (Value::Nil, e.name()).into_lua_multi(lua)
}

fn success<T: IntoLuaMulti>(lua: &Lua, v: T) -> mlua::Result<MultiValue> {
    v.into_lua_multi(lua)
}

/// An invite as Prosody's `mod_invites` returns it, without token or URI (the caller adds
/// them where it has the token). `id` is the short, non-secret name of the invite.
fn invite_table(lua: &Lua, key: &str, r: &InviteRecord, now: i64) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.raw_set("id", short_id_of_key(key))?;
    t.raw_set("type", r.kind.as_str())?;
    t.raw_set("jid", r.jid.as_str())?;
    t.raw_set("allow_registration", r.allow_registration)?;
    if let Some(data) = &r.additional_data {
        let options = SerializeOptions::new()
            .serialize_none_to_null(false)
            .serialize_unit_to_null(false)
            .set_array_metatable(false);
        t.raw_set("additional_data", lua.to_value_with(data, options)?)?;
    }
    t.raw_set("created_at", r.created_at)?;
    t.raw_set("expires", r.expires)?;
    t.raw_set("reusable", r.reusable)?;
    t.raw_set("inviter", r.inviter.as_deref())?;
    // Prosody's `username` on a validated invite is the inviting user of a roster invite.
    t.raw_set("username", r.inviter.as_deref())?;
    t.raw_set("bound_username", r.username.as_deref())?;
    t.raw_set("reset", r.reset.as_deref())?;
    t.raw_set("uses", r.uses)?;
    t.raw_set("max_uses", r.use_limit())?;
    t.raw_set("uses_left", r.uses_left())?;
    t.raw_set("status", r.status(now).as_str())?;
    Ok(t)
}

/// An invite with its token, URI and landing page, as Prosody's store gives it.
fn with_token(lua: &Lua, found: &Found, token: &Token, now: i64) -> mlua::Result<Table> {
    let t = invite_table(lua, &found.key, &found.record, now)?;
    t.raw_set("token", token.expose())?;
    t.raw_set("uri", record_uri(&found.record, token))?;
    if let Some(page) = &found.record.landing_page {
        t.raw_set("landing_page", page.with_token(token))?;
    }
    Ok(t)
}

/// A stored invite for listings: with its token where it was sealed and opens, otherwise
/// with its handle (the storage key, the token's SHA-256) as `token`, and no link.
fn listed_table(
    lua: &Lua,
    book: &Invites<LuaBackend>,
    key: &str,
    record: InviteRecord,
    now: i64,
) -> mlua::Result<Table> {
    let found = Found {
        key: key.to_owned(),
        record,
    };
    match book.token_of(key, &found.record) {
        Some(token) => with_token(lua, &found, &token, now),
        None => {
            let t = invite_table(lua, key, &found.record, now)?;
            t.raw_set("token", key)?;
            Ok(t)
        }
    }
}

/// Runs a method body so that a Rust panic becomes `nil, "internal-server-error"` and one
/// error line in the log (naming the method only: a panic message could carry anything).
fn guarded<F>(lua: &Lua, book: &Book, method: &str, body: F) -> mlua::Result<MultiValue>
where
    F: FnOnce() -> mlua::Result<MultiValue>,
{
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(result) => result,
        Err(_) => {
            book.0.backend().log(
                Level::Error,
                &format!("internal error in the invite core ({method}); the request was refused"),
            );
            failure(lua, InviteError::Storage)
        }
    }
}

fn token_arg(v: Value, n: usize, method: &str) -> mlua::Result<Result<String, InviteError>> {
    match v {
        Value::Nil => Ok(Err(InviteError::NoToken)),
        Value::String(s) => Ok(s
            .to_str()
            .map(|s| s.to_owned())
            .map_err(|_| InviteError::TokenInvalid)),
        other => Err(bad_argument(n, method, "string", &other)),
    }
}

macro_rules! token_or_fail {
    ($lua:expr, $v:expr, $n:expr, $method:expr) => {
        match token_arg($v, $n, $method)? {
            Ok(t) => t,
            Err(e) => return failure($lua, e),
        }
    };
}

impl UserData for Book {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method(
            "create",
            |lua, this, (spec, now, on_created): (Value, Value, Value)| {
                let Value::Table(spec) = spec else {
                    return Err(bad_argument(1, "create", "table", &spec));
                };
                let now = integer(&now, 2, "create")?;
                let on_created = match on_created {
                    Value::Nil => None,
                    Value::Function(f) => Some(f),
                    other => return Err(bad_argument(3, "create", "function or nil", &other)),
                };
                // Any whole number, as Prosody takes it: a negative ttl makes an expired invite.
                let ttl = field_integer(&spec, "ttl", "create")?;
                let max_uses = match spec.raw_get::<Value>("max_uses")? {
                Value::Nil => None,
                v => match integer(&v, 0, "create") {
                    Ok(n) if (1..=i64::from(u32::MAX)).contains(&n) => u32::try_from(n).ok(),
                    _ => return Err(mlua::Error::RuntimeError(String::from(
                        "bad field 'max_uses' in argument to 'create' (positive integer expected)",
                    ))),
                },
            };
                let new = NewInvite {
                    kind: kind(&spec, "create")?,
                    jid: match opt_field_string(&spec, "jid", "create")? {
                        Some(j) if !j.is_empty() => j,
                        _ => return Err(mlua::Error::RuntimeError(String::from(
                            "bad field 'jid' in argument to 'create' (non-empty string expected)",
                        ))),
                    },
                    allow_registration: opt_field_bool(&spec, "allow_registration", "create")?,
                    additional_data: json_of(
                        lua,
                        spec.raw_get("additional_data")?,
                        "additional_data",
                        "create",
                    )?,
                    ttl,
                    reusable: opt_field_bool(&spec, "reusable", "create")?,
                    max_uses,
                    username: opt_field_string(&spec, "username", "create")?,
                    reset: opt_field_string(&spec, "reset", "create")?,
                    inviter: opt_field_string(&spec, "inviter", "create")?,
                };
                guarded(lua, this, "create", || {
                    let mut created = this.0.prepare(new, now);
                    let found = Found {
                        key: created.key.clone(),
                        record: created.record.clone(),
                    };
                    let invite = with_token(lua, &found, &created.token, now)?;
                    // As Prosody: handlers of invite-created see the invite before it is
                    // stored, and what they change in additional_data and landing_page is kept.
                    if let Some(f) = on_created {
                        f.call::<()>(invite.clone())?;
                        created.record.additional_data = json_of(
                            lua,
                            invite.raw_get("additional_data")?,
                            "additional_data",
                            "create",
                        )?;
                        created.record.landing_page =
                            opt_field_string(&invite, "landing_page", "create")?
                                .map(|url| LandingPage::without_token(&url, &created.token));
                    }
                    match this.0.store_created(&mut created) {
                        Ok(()) => success(lua, invite),
                        Err(e) => failure(lua, e),
                    }
                })
            },
        );

        methods.add_method(
            "get",
            |lua, this, (token, contact_of, host, now): (Value, Value, Value, Value)| {
                let token = token_or_fail!(lua, token, 1, "get");
                let contact_of = opt_string(contact_of, 2, "get")?;
                let host = string(host, 3, "get")?;
                let now = integer(&now, 4, "get")?;
                guarded(lua, this, "get", || {
                    match this.0.validate(&token, contact_of.as_deref(), &host, now) {
                        Ok(found) => {
                            let token = match Token::parse(&token) {
                                Ok(t) => t,
                                Err(e) => return failure(lua, e),
                            };
                            let t = with_token(lua, &found, &token, now)?;
                            if let Some(user) = &contact_of {
                                t.raw_set("username", user.as_str())?;
                            }
                            success(lua, t)
                        }
                        Err(e) => failure(lua, e),
                    }
                })
            },
        );

        methods.add_method(
            "reserve",
            |lua, this, (token, claim, host, now): (Value, Value, Value, Value)| {
                let token = token_or_fail!(lua, token, 1, "reserve");
                let Value::Table(claim) = claim else {
                    return Err(bad_argument(2, "reserve", "table", &claim));
                };
                let host = string(host, 3, "reserve")?;
                let now = integer(&now, 4, "reserve")?;
                let holder = string(claim.raw_get("holder")?, 2, "reserve")?;
                let username = string(claim.raw_get("username")?, 2, "reserve")?;
                let account_exists = opt_field_bool(&claim, "account_exists", "reserve")?;
                let validated_at = field_integer(&claim, "validated_at", "reserve")?;
                let lease_until = field_integer(&claim, "lease_until", "reserve")?;
                let claim = Claim {
                    holder: &holder,
                    username: &username,
                    account_exists,
                    validated_at,
                    lease_until,
                };
                guarded(lua, this, "reserve", || {
                    match this.0.reserve(&token, &claim, &host, now) {
                        Ok(found) => {
                            success(lua, invite_table(lua, &found.key, &found.record, now)?)
                        }
                        Err(e) => failure(lua, e),
                    }
                })
            },
        );

        methods.add_method(
            "confirm",
            |lua, this, (token, holder, host, now): (Value, Value, Value, Value)| {
                let token = token_or_fail!(lua, token, 1, "confirm");
                let holder = string(holder, 2, "confirm")?;
                let host = string(host, 3, "confirm")?;
                let now = integer(&now, 4, "confirm")?;
                guarded(lua, this, "confirm", || {
                    match this.0.confirm(&token, &holder, &host, now) {
                        Ok(found) => {
                            success(lua, invite_table(lua, &found.key, &found.record, now)?)
                        }
                        Err(e) => failure(lua, e),
                    }
                })
            },
        );

        methods.add_method("release", |lua, this, (token, holder): (Value, Value)| {
            let token = token_or_fail!(lua, token, 1, "release");
            let holder = string(holder, 2, "release")?;
            guarded(lua, this, "release", || {
                match this.0.release(&token, &holder) {
                    Ok(released) => success(lua, released),
                    Err(e) => failure(lua, e),
                }
            })
        });

        methods.add_method(
            "use",
            |lua, this, (token, contact_of, host, now): (Value, Value, Value, Value)| {
                let token = token_or_fail!(lua, token, 1, "use");
                let contact_of = opt_string(contact_of, 2, "use")?;
                let host = string(host, 3, "use")?;
                let now = integer(&now, 4, "use")?;
                guarded(lua, this, "use", || {
                    match this.0.consume(&token, contact_of.as_deref(), &host, now) {
                        Ok(found) => {
                            success(lua, invite_table(lua, &found.key, &found.record, now)?)
                        }
                        Err(e) => failure(lua, e),
                    }
                })
            },
        );

        methods.add_method("revoke", |lua, this, (token, now): (Value, Value)| {
            let token = token_or_fail!(lua, token, 1, "revoke");
            let now = integer(&now, 2, "revoke")?;
            guarded(lua, this, "revoke", || match this.0.revoke(&token, now) {
                Ok(found) => success(lua, invite_table(lua, &found.key, &found.record, now)?),
                Err(e) => failure(lua, e),
            })
        });

        methods.add_method("revoke_key", |lua, this, (key, now): (Value, Value)| {
            let key = string(key, 1, "revoke_key")?;
            let now = integer(&now, 2, "revoke_key")?;
            guarded(lua, this, "revoke_key", || {
                match this.0.revoke_key(&key, now) {
                    Ok(found) => success(lua, invite_table(lua, &found.key, &found.record, now)?),
                    Err(e) => failure(lua, e),
                }
            })
        });

        methods.add_method(
            "prune",
            |lua, this, (key, now, keep): (Value, Value, Value)| {
                let key = string(key, 1, "prune")?;
                let now = integer(&now, 2, "prune")?;
                let keep = integer(&keep, 3, "prune")?;
                guarded(lua, this, "prune", || match this.0.prune(&key, now, keep) {
                    Ok(removed) => success(lua, removed),
                    Err(e) => failure(lua, e),
                })
            },
        );

        methods.add_method(
            "username_reserved",
            |lua, this, (username, now): (Value, Value)| {
                let username = string(username, 1, "username_reserved")?;
                let now = integer(&now, 2, "username_reserved")?;
                guarded(lua, this, "username_reserved", || {
                    match this.0.username_reserved(&username, now, None) {
                        Ok(reserved) => success(lua, reserved),
                        Err(e) => failure(lua, e),
                    }
                })
            },
        );

        methods.add_method("listed", |lua, this, (key, now): (Value, Value)| {
            let key = string(key, 1, "listed")?;
            let now = integer(&now, 2, "listed")?;
            guarded(lua, this, "listed", || match this.0.listed(&key, now) {
                Ok(Some(record)) => success(lua, listed_table(lua, &this.0, &key, record, now)?),
                Ok(None) => success(lua, Value::Nil),
                Err(e) => failure(lua, e),
            })
        });

        methods.add_method(
            "import_legacy",
            |lua, this, (token, legacy, contact_of, now): (Value, Value, Value, Value)| {
                let token = token_or_fail!(lua, token, 1, "import_legacy");
                let Value::Table(legacy) = legacy else {
                    return Err(bad_argument(2, "import_legacy", "table", &legacy));
                };
                let contact_of = opt_string(contact_of, 3, "import_legacy")?;
                let now = integer(&now, 4, "import_legacy")?;
                let m = "import_legacy";
                let legacy = LegacyInvite {
                    kind: kind(&legacy, m)?,
                    jid: string(legacy.raw_get("jid")?, 2, m)?,
                    allow_registration: opt_field_bool(&legacy, "allow_registration", m)?,
                    additional_data: json_of(
                        lua,
                        legacy.raw_get("additional_data")?,
                        "additional_data",
                        m,
                    )?,
                    created_at: field_integer(&legacy, "created_at", m)?,
                    expires: field_integer(&legacy, "expires", m)?,
                    reusable: opt_field_bool(&legacy, "reusable", m)?,
                    contact_of,
                    landing_page: opt_field_string(&legacy, "landing_page", m)?,
                };
                guarded(lua, this, "import_legacy", || {
                    match this.0.import_legacy(&token, legacy, now) {
                        Ok(imported) => success(lua, imported),
                        Err(e) => failure(lua, e),
                    }
                })
            },
        );
    }
}

/// Per-IP preauth limits (see `throttle.rs`), as userdata.
pub struct LuaThrottle(RefCell<Throttle>);

impl UserData for LuaThrottle {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("allows", |_, this, (address, now): (Value, Value)| {
            let address = string(address, 1, "allows")?;
            let now = integer(&now, 2, "allows")?;
            Ok(this.0.borrow().allows(&address, now))
        });
        methods.add_method("retry_after", |_, this, (address, now): (Value, Value)| {
            let address = string(address, 1, "retry_after")?;
            let now = integer(&now, 2, "retry_after")?;
            Ok(this.0.borrow().retry_after(&address, now))
        });
        methods.add_method("failed", |_, this, (address, now): (Value, Value)| {
            let address = string(address, 1, "failed")?;
            let now = integer(&now, 2, "failed")?;
            this.0.borrow_mut().failed(&address, now);
            Ok(true)
        });
        methods.add_method("tracked", |_, this, ()| Ok(this.0.borrow().tracked()));
    }
}

fn positive(v: &Value, n: usize, method: &str) -> mlua::Result<i64> {
    match integer(v, n, method) {
        Ok(i) if i > 0 => Ok(i),
        _ => Err(bad_argument(n, method, "positive integer", v)),
    }
}

/// The table `luaopen_prosody_invites` returns.
pub fn exports(lua: &Lua) -> mlua::Result<Table> {
    let exports = lua.create_table()?;
    exports.set("version", env!("CARGO_PKG_VERSION"))?;
    exports.set(
        "new",
        lua.create_function(|lua, config: Value| {
            let Value::Table(config) = config else {
                return Err(bad_argument(1, "new", "table", &config));
            };
            let host = match config.raw_get::<Value>("host")? {
                Value::String(s) if !s.as_bytes().is_empty() => s.to_str()?.to_owned(),
                other => return Err(bad_field("host", "new", "non-empty string", &other)),
            };
            let invites: Table = match config.raw_get::<Value>("invites")? {
                Value::Table(t) => t,
                other => return Err(bad_field("invites", "new", "store", &other)),
            };
            let names: Table = match config.raw_get::<Value>("names")? {
                Value::Table(t) => t,
                other => return Err(bad_field("names", "new", "store", &other)),
            };
            let log = match config.raw_get::<Value>("log")? {
                Value::Nil => None,
                Value::Function(f) => Some(f),
                other => return Err(bad_field("log", "new", "function or nil", &other)),
            };
            let account_exists = match config.raw_get::<Value>("account_exists")? {
                Value::Nil => None,
                Value::Function(f) => Some(f),
                other => {
                    return Err(bad_field(
                        "account_exists",
                        "new",
                        "function or nil",
                        &other,
                    ))
                }
            };
            // Sealed with a key file where one is named; "hash" keeps hashes only.
            let key_file = opt_field_string(&config, "key_file", "new")?;
            let storage = match opt_field_string(&config, "token_storage", "new")?.as_deref() {
                Some("hash") => TokenStorage::Hash,
                None if key_file.is_none() => TokenStorage::Hash,
                Some("sealed") | None => match key_file {
                    Some(path) if !path.is_empty() => TokenStorage::Sealed(path.into()),
                    _ => {
                        return Err(mlua::Error::RuntimeError(String::from(
                            "bad field 'key_file' in argument to 'new' (a path expected \
                             with token_storage \"sealed\")",
                        )))
                    }
                },
                Some(_) => {
                    return Err(mlua::Error::RuntimeError(String::from(
                        "bad field 'token_storage' in argument to 'new' \
                         (\"sealed\" or \"hash\" expected)",
                    )))
                }
            };
            let backend = LuaBackend {
                lua: lua.weak(),
                invites,
                names,
                log,
                account_exists,
            };
            lua.create_userdata(Book(
                Invites::new(backend, &host).with_token_storage(storage),
            ))
        })?,
    )?;
    exports.set(
        "throttle",
        lua.create_function(|lua, (max, period, capacity): (Value, Value, Value)| {
            let max = u32::try_from(positive(&max, 1, "throttle")?).unwrap_or(u32::MAX);
            let period = positive(&period, 2, "throttle")?;
            let capacity =
                usize::try_from(positive(&capacity, 3, "throttle")?).unwrap_or(usize::MAX);
            lua.create_userdata(LuaThrottle(RefCell::new(Throttle::new(
                max, period, capacity,
            ))))
        })?,
    )?;
    exports.set(
        "parse_duration",
        lua.create_function(|lua, text: Value| {
            let text = string(text, 1, "parse_duration")?;
            match parse_duration(&text) {
                Ok(seconds) => (Value::Integer(seconds), Value::Nil).into_lua_multi(lua),
                Err(e) => (Value::Nil, e.to_string()).into_lua_multi(lua),
            }
        })?,
    )?;
    exports.set(
        "key_of",
        lua.create_function(|lua, token: Value| {
            let token = string(token, 1, "key_of")?;
            match Token::parse(&token) {
                Ok(t) => (t.hash().key(), Value::Nil).into_lua_multi(lua),
                Err(e) => (Value::Nil, e.name()).into_lua_multi(lua),
            }
        })?,
    )?;
    Ok(exports)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a book over an in-Lua store whose `get` calls `broken_get` (a Rust function
    /// that panics) while the global `broken` is true.
    fn book_with_breakable_store(lua: &Lua) -> mlua::Result<()> {
        lua.globals().set("core", exports(lua)?)?;
        let broken_get =
            lua.create_function(|_, ()| -> mlua::Result<()> { panic!("a bug in a driver") })?;
        lua.globals().set("broken_get", broken_get)?;
        lua.load(
            r#"
            lines = {}
            local function memory()
                local data = {}
                return {
                    get = function (_, owner)
                        if broken then return broken_get() end
                        return data[owner]
                    end;
                    set = function (_, owner, value) data[owner] = value; return true end;
                }
            end
            book = core.new({ host = "example.com", invites = memory(), names = memory(),
                log = function (level, message) lines[#lines + 1] = level .. ": " .. message end })
            invite = assert(book:create({ type = "register", jid = "example.com",
                allow_registration = true, ttl = 3600 }, 1700000000))
            "#,
        )
        .exec()
    }

    #[test]
    fn a_panic_under_a_method_is_one_error_line_and_nil_internal_server_error() -> mlua::Result<()>
    {
        let lua = Lua::new();
        book_with_breakable_store(&lua)?;
        let (got, err, lines, token): (Value, String, Vec<String>, String) = lua
            .load(
                r#"
                broken = true
                lines = {}
                local got, err = book:get(invite.token, nil, "example.com", 1700000001)
                return got, err, lines, invite.token
                "#,
            )
            .eval()?;
        assert!(got.is_nil());
        assert_eq!(err, "internal-server-error");
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].starts_with("error: "), "{lines:?}");
        assert!(!lines[0].contains(&token));

        // The same book, in the same Lua state, works again once the store does.
        let status: String = lua
            .load(r#"broken = false; return assert(book:get(invite.token, nil, "example.com", 1700000001)).status"#)
            .eval()?;
        assert_eq!(status, "pending");
        Ok(())
    }

    /// Creates an invite whose `additional_data` is `depth` nested tables; returns whether
    /// `create` raised, with its message, and whether the invite reads back through `get`.
    fn create_with_nested_data(lua: &Lua, depth: i64) -> mlua::Result<(bool, String, bool)> {
        book_with_breakable_store(lua)?;
        lua.load(
            r#"
            local depth = ...
            local data = {}
            for _ = 2, depth do data = { data } end
            local ok, created = pcall(book.create, book, { type = "register",
                jid = "example.com", allow_registration = true, ttl = 3600,
                additional_data = data }, 1700000000)
            if not ok then return false, tostring(created), false end
            return true, "", book:get(created.token, nil, "example.com", 1700000001) ~= nil
            "#,
        )
        .call(depth)
    }

    // Found by fuzzing (fuzz/corpus/lua_values/seed-crash-data-nested-127): the invite was
    // written, but its record nested deeper than serde_json reads back, so it never worked.
    #[test]
    fn additional_data_nested_deeper_than_a_record_holds_is_refused() -> mlua::Result<()> {
        let (created, _, readable) = create_with_nested_data(&Lua::new(), 32)?;
        assert!(created && readable);
        for depth in [33, 127] {
            let (created, message, _) = create_with_nested_data(&Lua::new(), depth)?;
            assert!(!created, "depth {depth}");
            assert!(message.contains("bad field 'additional_data'"), "{message}");
        }
        Ok(())
    }

    // Found by fuzzing (fuzz/corpus/lua_values/seed-crash-data-nested-20000): converting
    // the table recursed once per level and overflowed the stack, aborting the process.
    #[test]
    fn deep_or_cyclic_additional_data_raises_instead_of_overflowing() -> mlua::Result<()> {
        let (created, message, _) = create_with_nested_data(&Lua::new(), 200_000)?;
        assert!(!created);
        assert!(message.contains("at most 32 tables deep"), "{message}");

        let lua = Lua::new();
        book_with_breakable_store(&lua)?;
        let (ok, message): (bool, String) = lua
            .load(
                r#"
                local cycle = {}
                cycle[1], cycle[2], cycle.x = cycle, cycle, cycle
                local ok, e = pcall(book.create, book, { type = "register", jid = "example.com",
                    ttl = 3600, additional_data = { a = cycle } }, 1700000000)
                return ok, tostring(e)
                "#,
            )
            .eval()?;
        assert!(!ok);
        assert!(message.contains("bad field 'additional_data'"), "{message}");
        Ok(())
    }

    #[test]
    fn a_panic_while_reserving_holds_no_use() -> mlua::Result<()> {
        let lua = Lua::new();
        book_with_breakable_store(&lua)?;
        let (err, uses_left): (String, Value) = lua
            .load(
                r#"
                broken = true
                local _, err = book:reserve(invite.token, { holder = "h1", username = "alice",
                    account_exists = false, validated_at = 1700000001, lease_until = 1700000121 },
                    "example.com", 1700000001)
                broken = false
                return err, assert(book:get(invite.token, nil, "example.com", 1700000002)).uses_left
                "#,
            )
            .eval()?;
        assert_eq!(err, "internal-server-error");
        assert_eq!(uses_left, Value::Integer(1));
        Ok(())
    }
}
