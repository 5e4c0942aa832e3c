//! The Lua adapter: converts between Lua values and the core, and nothing else.
//!
//! Exports (`require`d through `package.loadlib`):
//! - `new{ host = "example.com", invites = store, names = store, accounts = store,
//!   log = function(level, message), account_exists = function(username),
//!   token_storage = "sealed" | "hash", key_file = path }`
//!   → the book of that virtual host, where the stores are Prosody keyval stores
//!   (`module:open_store(...)`); tokens are sealed with the key in `key_file` (made on first
//!   use), or kept as hashes only. `accounts` (optional) keeps the invite tree and quotas;
//!   without it, the tree reads as empty and keeps nothing.
//! - book methods `create`, `prepare`, `store`, `get`, `reserve`, `confirm`, `release`,
//!   `resolve`, `use` (redeem), `revoke`, `revoke_key`, `prune`, `username_reserved`,
//!   `listed`, `import_legacy` (see `lua/mod_invites/mod_invites.lua`), and for invite
//!   governance `edit`, `account`, `account_registered`, `account_deleted`, `revoke_by`,
//!   `charge` (each documented at its function below). `get`, `reserve`, `confirm` and
//!   `use` take the host the caller acts for (the stream's or the new account's), and give
//!   `nil, "wrong-host"` unless it is the book's.
//! - The spec of `create` and `prepare` may say who made the invite and where: `creator` (a
//!   username), `source` (at most 256 bytes), `note` (at most 1024 bytes). Invite tables
//!   carry them, and `redemptions`: `{ { account = "bob", at = 1700000000, reset = false }, … }`
//!   (`account` is nil for a use nobody was named for).
//! - `throttle(max, period, capacity)`, `period(value, min, can_be_off)`,
//!   `parse_duration(text)`, `key_of(token)`, `version`.
//!
//! Each export and method is one function below; arguments arrive as `Value`s and are
//! converted, in order, through the `FromLua` types of the "Arguments" section.
//! Wrong argument types raise (API misuse); expected failures return `nil, "error-name"`.
//! No Rust panic crosses into Lua: every book method runs under `catch_unwind` and reports
//! a panic as `nil, "internal-server-error"`.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::num::NonZeroU32;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;

use mlua::{
    DeserializeOptions, FromLua, Function, IntoLuaMulti, Lua, LuaSerdeExt, MultiValue,
    SerializeOptions, Table, UserData, UserDataFields, UserDataMethods, Value, WeakLua,
};
use zeroize::Zeroizing;

use crate::book::{record_uri, Book, Created, LegacyInvite, NewInvite, Provenance, TokenStorage};
use crate::duration::{parse_duration, period_setting, PeriodSetting};
use crate::error::{InviteError, StoreError};
use crate::quota::Rule;
use crate::record::{
    AccountEntry, InviteKind, InviteRecord, LandingPage, MAX_NOTE_LEN, MAX_SOURCE_LEN,
};
use crate::state::{Claim, Edit, Status};
use crate::store::{read_decide_write, update_by_swap, Backend, Level, Space, Write};
use crate::throttle::Throttle;
use crate::token::{Token, TokenHash};

/// Prosody keyval stores and a log function, as handed over by the shim, and how a change
/// is kept atomic between processes sharing the storage (`Atomic`).
pub struct LuaBackend {
    lua: WeakLua,
    invites: Table,
    names: Table,
    /// The invite tree's store; without one, it reads as empty and keeps nothing.
    accounts: Option<Table>,
    log: Option<Function>,
    account_exists: Option<Function>,
    /// Per space (`Space` order: invites, names, accounts): stores may be routed to
    /// different storage (`storage = { invites = "sql" }`).
    atomic: [Atomic; 3],
}

/// How `update` keeps other processes out between its read and its write.
enum Atomic {
    /// Not at all (a storage module we cannot lock): atomic within this process only.
    Process,
    /// The shim's `swap(space, owner, expected, new)`: a compare-and-set in the database
    /// (a conditional UPDATE, DELETE or INSERT on Prosody's SQL table), true when it took.
    CompareAndSet(Function),
    /// An advisory lock (flock) on this file, held around each change: files in a data
    /// directory that the server and prosodyctl share. One lock for every space.
    FileLock(Rc<FileLock>),
}

/// A lock file, opened on first use, locked around each change. A change made inside
/// another (a name indexed while an invite is edited) is inside the same lock.
struct FileLock {
    path: std::path::PathBuf,
    file: RefCell<Option<std::fs::File>>,
    depth: Cell<usize>,
}

/// The lock of a `FileLock`, held until dropped (on every path out of a change).
struct Held<'a>(&'a FileLock);

impl FileLock {
    fn hold(&self) -> Result<Held<'_>, StoreError> {
        if self.depth.get() == 0 {
            let mut file = self.file.borrow_mut();
            if file.is_none() {
                let opened = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&self.path)
                    .map_err(|e| self.failed("open", &e))?;
                *file = Some(opened);
            }
            if let Some(f) = file.as_ref() {
                f.lock().map_err(|e| self.failed("lock", &e))?;
            }
        }
        self.depth.set(self.depth.get() + 1);
        Ok(Held(self))
    }

    fn failed(&self, what: &str, e: &std::io::Error) -> StoreError {
        StoreError::Backend(format!("could not {what} {}: {e}", self.path.display()))
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let lock = self.0;
        lock.depth.set(lock.depth.get().saturating_sub(1));
        if lock.depth.get() == 0 {
            if let Some(f) = lock.file.borrow().as_ref() {
                // Closing the file would release it too; it stays open for the next change.
                let _ = f.unlock();
            }
        }
    }
}

impl LuaBackend {
    fn store(&self, space: Space) -> Option<&Table> {
        match space {
            Space::Invites => Some(&self.invites),
            Space::Names => Some(&self.names),
            Space::Accounts => self.accounts.as_ref(),
        }
    }

    /// One compare-and-set by the shim's `swap`: whether it took.
    fn swap(
        &self,
        swap: &Function,
        space: Space,
        owner: &str,
        expected: Option<&str>,
        new: Option<&str>,
    ) -> Result<bool, StoreError> {
        let (took, err): (Value, Value) = swap
            .call((space_name(space), owner, expected, new))
            .map_err(|e| StoreError::Backend(lua_error_text(&e)))?;
        match took {
            Value::Boolean(took) => Ok(took),
            Value::Nil => Err(StoreError::Backend(describe(&err))),
            other => Err(StoreError::Backend(format!(
                "swap answered {}",
                other.type_name()
            ))),
        }
    }
}

/// The name of a space, as the shim's `swap` knows it.
fn space_name(space: Space) -> &'static str {
    match space {
        Space::Invites => "invites",
        Space::Names => "names",
        Space::Accounts => "accounts",
    }
}

fn lua_error_text(e: &mlua::Error) -> String {
    // Only the first line: tracebacks add nothing an admin can act on.
    e.to_string().lines().next().unwrap_or("").to_owned()
}

impl Backend for LuaBackend {
    fn get(&self, space: Space, owner: &str) -> Result<Option<String>, StoreError> {
        let Some(store) = self.store(space) else {
            return Ok(None);
        };
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
        let Some(store) = self.store(space) else {
            return Ok(());
        };
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

    fn update(
        &self,
        space: Space,
        owner: &str,
        decide: &mut dyn FnMut(Option<&str>) -> Write,
    ) -> Result<bool, StoreError> {
        if self.store(space).is_none() {
            return Ok(false);
        }
        let swap = match &self.atomic[space as usize] {
            Atomic::CompareAndSet(swap) => swap,
            // Nothing else writes while the lock is held (or, without one, while this runs:
            // Prosody runs one thing at a time).
            Atomic::FileLock(lock) => {
                let _held = lock.hold()?;
                return read_decide_write(self, space, owner, decide);
            }
            Atomic::Process => return read_decide_write(self, space, owner, decide),
        };
        update_by_swap(self, space, owner, decide, &mut |expected, new| {
            self.swap(swap, space, owner, expected, new)
        })
    }

    fn insert(&self, space: Space, owner: &str, value: &str) -> Result<bool, StoreError> {
        match &self.atomic[space as usize] {
            // The conditional INSERT is the check: no read before it.
            Atomic::CompareAndSet(swap) if self.store(space).is_some() => {
                self.swap(swap, space, owner, None, Some(value))
            }
            _ => self.update(space, owner, &mut |stored| match stored {
                None => Write::Put(value.to_owned()),
                Some(_) => Write::Keep,
            }),
        }
    }

    fn keeps(&self, space: Space) -> bool {
        self.store(space).is_some()
    }

    /// Calls `visit` with each owner of the store (`store:users()`) until it says stop.
    fn each_key(
        &self,
        space: Space,
        visit: &mut dyn FnMut(&str) -> bool,
    ) -> Result<(), StoreError> {
        let Some(store) = self.store(space) else {
            return Ok(());
        };
        let backend_error = |e: mlua::Error| StoreError::Backend(lua_error_text(&e));
        let users: Function = store.get("users").map_err(backend_error)?;
        let (next, state, mut control): (Function, Value, Value) =
            users.call(store.clone()).map_err(backend_error)?;
        loop {
            let key: Value = next.call((state.clone(), control)).map_err(backend_error)?;
            match &key {
                Value::Nil => return Ok(()),
                Value::String(s) => {
                    if let Ok(k) = s.to_str() {
                        if !visit(&k) {
                            return Ok(());
                        }
                    }
                }
                _ => {}
            }
            control = key;
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
                // Any other value is true to Lua.
                Ok(_) => Ok(true),
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

// ---------------------------------------------------------------------------------------
// Arguments. mlua would coerce quietly (a number for a string, 1.5 for 1, anything for a
// boolean), so each kind of argument is a `FromLua` type that checks what it gets and
// says what it expected. `arg` and `field` add where, in the words of Lua's own messages:
// "bad argument #2 to 'create' (integer expected, got number)".

/// Why a value was refused, without where: `arg` names the argument and the function.
#[derive(Debug)]
enum Refused {
    /// The value itself; the text stands between the parentheses of the message.
    Value(String),
    /// A field of a table argument.
    Field(&'static str, String),
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::Value(detail) => f.write_str(detail),
            Refused::Field(name, detail) => write!(f, "bad field '{name}' ({detail})"),
        }
    }
}

impl std::error::Error for Refused {}

fn refused(detail: impl Into<String>) -> mlua::Error {
    mlua::Error::external(Refused::Value(detail.into()))
}

fn refused_field(name: &'static str, detail: impl Into<String>) -> mlua::Error {
    mlua::Error::external(Refused::Field(name, detail.into()))
}

/// `what` was expected, and `got` came.
fn expected(what: &str, got: &Value) -> mlua::Error {
    refused(format!("{what} expected, got {}", got.type_name()))
}

/// Argument `n` of `function`, converted through its `FromLua` type. Other errors (a
/// string that is not UTF-8, a failing metamethod) pass as they are.
fn arg<T: FromLua>(lua: &Lua, value: Value, n: usize, function: &str) -> mlua::Result<T> {
    T::from_lua(value, lua).map_err(|e| match e.downcast_ref::<Refused>() {
        Some(Refused::Value(detail)) => {
            mlua::Error::RuntimeError(format!("bad argument #{n} to '{function}' ({detail})"))
        }
        Some(Refused::Field(name, detail)) => mlua::Error::RuntimeError(format!(
            "bad field '{name}' in argument to '{function}' ({detail})"
        )),
        None => e,
    })
}

/// Field `name` of a table argument, converted through its `FromLua` type.
fn field<T: FromLua>(lua: &Lua, table: &Table, name: &'static str) -> mlua::Result<T> {
    T::from_lua(table.raw_get(name)?, lua).map_err(|e| match e.downcast_ref::<Refused>() {
        Some(Refused::Value(detail)) => refused_field(name, detail.as_str()),
        _ => e,
    })
}

/// A whole number: a moment (`now`) or seconds. Lua 5.1 and LuaJIT pass every number as a
/// float, so a float counts when it is whole and exactly representable.
struct Integer(i64);

impl FromLua for Integer {
    fn from_lua(value: Value, _: &Lua) -> mlua::Result<Self> {
        match value {
            Value::Integer(i) => Ok(Integer(i)),
            Value::Number(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(Integer(f as i64)),
            other => Err(expected("integer", &other)),
        }
    }
}

/// A whole number above zero.
struct Positive(i64);

impl FromLua for Positive {
    fn from_lua(value: Value, lua: &Lua) -> mlua::Result<Self> {
        match Integer::from_lua(value.clone(), lua) {
            Ok(Integer(i)) if i > 0 => Ok(Positive(i)),
            _ => Err(expected("positive integer", &value)),
        }
    }
}

/// A string (of UTF-8).
struct Text(String);

impl FromLua for Text {
    fn from_lua(value: Value, _: &Lua) -> mlua::Result<Self> {
        match value {
            Value::String(s) => Ok(Text(s.to_str()?.to_owned())),
            other => Err(expected("string", &other)),
        }
    }
}

/// A string, or nil.
struct OptText(Option<String>);

impl FromLua for OptText {
    fn from_lua(value: Value, _: &Lua) -> mlua::Result<Self> {
        match value {
            Value::Nil => Ok(OptText(None)),
            Value::String(s) => Ok(OptText(Some(s.to_str()?.to_owned()))),
            other => Err(expected("string or nil", &other)),
        }
    }
}

/// A string of at most `MAX` bytes, or nil.
struct Bounded<const MAX: usize>(Option<String>);

impl<const MAX: usize> FromLua for Bounded<MAX> {
    fn from_lua(value: Value, lua: &Lua) -> mlua::Result<Self> {
        match OptText::from_lua(value, lua)?.0 {
            Some(text) if text.len() > MAX => Err(refused(format!(
                "string of at most {MAX} bytes expected, got {} bytes",
                text.len()
            ))),
            text => Ok(Bounded(text)),
        }
    }
}

/// A local username (a creator), or nil.
struct OptUsername(Option<String>);

impl FromLua for OptUsername {
    fn from_lua(value: Value, lua: &Lua) -> mlua::Result<Self> {
        match OptText::from_lua(value, lua)?.0 {
            Some(name) if name.is_empty() => Err(refused("non-empty string or nil expected")),
            name => Ok(OptUsername(name)),
        }
    }
}

/// A whole number, or nil.
struct OptInteger(Option<i64>);

impl FromLua for OptInteger {
    fn from_lua(value: Value, lua: &Lua) -> mlua::Result<Self> {
        if value.is_nil() {
            return Ok(OptInteger(None));
        }
        match Integer::from_lua(value.clone(), lua) {
            Ok(Integer(i)) => Ok(OptInteger(Some(i))),
            Err(_) => Err(expected("integer or nil", &value)),
        }
    }
}

/// Seconds of a quota rule: nil, or a whole number from `MIN` up.
struct OptSeconds<const MIN: i64>(Option<i64>);

impl<const MIN: i64> FromLua for OptSeconds<MIN> {
    fn from_lua(value: Value, lua: &Lua) -> mlua::Result<Self> {
        match OptInteger::from_lua(value, lua)?.0 {
            Some(n) if n < MIN => Err(refused(format!(
                "integer of at least {MIN} or nil expected"
            ))),
            n => Ok(OptSeconds(n)),
        }
    }
}

/// A quota's limit: nil, or a whole number from 0 to 2^32 - 1.
struct OptLimit(Option<u32>);

impl FromLua for OptLimit {
    fn from_lua(value: Value, lua: &Lua) -> mlua::Result<Self> {
        match OptInteger::from_lua(value, lua)?.0.map(u32::try_from) {
            None => Ok(OptLimit(None)),
            Some(Ok(n)) => Ok(OptLimit(Some(n))),
            Some(Err(_)) => Err(refused("integer from 0 to 4294967295 or nil expected")),
        }
    }
}

/// An edit's `note`: a string to set, `false` to remove it, nil to leave it.
struct NoteChange(Option<Option<String>>);

impl FromLua for NoteChange {
    fn from_lua(value: Value, lua: &Lua) -> mlua::Result<Self> {
        match value {
            Value::Nil => Ok(NoteChange(None)),
            Value::Boolean(false) => Ok(NoteChange(Some(None))),
            Value::String(_) => {
                let Bounded::<MAX_NOTE_LEN>(note) = Bounded::from_lua(value, lua)?;
                Ok(NoteChange(Some(note)))
            }
            other => Err(expected("string, false or nil", &other)),
        }
    }
}

/// A boolean; nil is false (and nothing else is).
struct Flag(bool);

impl FromLua for Flag {
    fn from_lua(value: Value, _: &Lua) -> mlua::Result<Self> {
        match value {
            Value::Nil => Ok(Flag(false)),
            Value::Boolean(b) => Ok(Flag(b)),
            other => Err(expected("boolean or nil", &other)),
        }
    }
}

/// Whether a listing wants the invite's link: a boolean, or nil for yes.
struct WithLink(bool);

impl FromLua for WithLink {
    fn from_lua(value: Value, _: &Lua) -> mlua::Result<Self> {
        match value {
            Value::Nil => Ok(WithLink(true)),
            Value::Boolean(b) => Ok(WithLink(b)),
            other => Err(expected("boolean or nil", &other)),
        }
    }
}

/// A function, or nil.
struct Callback(Option<Function>);

impl FromLua for Callback {
    fn from_lua(value: Value, _: &Lua) -> mlua::Result<Self> {
        match value {
            Value::Nil => Ok(Callback(None)),
            Value::Function(f) => Ok(Callback(Some(f))),
            other => Err(expected("function or nil", &other)),
        }
    }
}

/// A table. (A spec argument is checked to be one first, its fields after the arguments
/// that follow it, as they always were.)
struct TableArg(Table);

impl FromLua for TableArg {
    fn from_lua(value: Value, _: &Lua) -> mlua::Result<Self> {
        match value {
            Value::Table(t) => Ok(TableArg(t)),
            other => Err(expected("table", &other)),
        }
    }
}

/// The token a caller presents, as text (the core parses it, once), or the answer for a
/// value that holds none: nil is `no-token`, a string that is not UTF-8 `token-invalid`.
/// The text is wiped when dropped.
struct TokenArg(Result<Zeroizing<String>, InviteError>);

impl FromLua for TokenArg {
    fn from_lua(value: Value, _: &Lua) -> mlua::Result<Self> {
        match value {
            Value::Nil => Ok(TokenArg(Err(InviteError::NoToken))),
            Value::String(s) => Ok(TokenArg(
                s.to_str()
                    .map(|t| Zeroizing::new(t.to_owned()))
                    .map_err(|_| InviteError::TokenInvalid),
            )),
            other => Err(expected("string", &other)),
        }
    }
}

/// A key as listings and `resolve` give it: `None` for a string that is no key, which no
/// invite has.
struct Key(Option<TokenHash>);

impl FromLua for Key {
    fn from_lua(value: Value, lua: &Lua) -> mlua::Result<Self> {
        let Text(key) = Text::from_lua(value, lua)?;
        Ok(Key(TokenHash::from_key(&key)))
    }
}

/// The virtual host a book serves.
struct Host(String);

impl FromLua for Host {
    fn from_lua(value: Value, _: &Lua) -> mlua::Result<Self> {
        match value {
            Value::String(s) if !s.as_bytes().is_empty() => Ok(Host(s.to_str()?.to_owned())),
            other => Err(expected("non-empty string", &other)),
        }
    }
}

/// A Prosody keyval store (`module:open_store(...)`).
struct Store(Table);

impl FromLua for Store {
    fn from_lua(value: Value, _: &Lua) -> mlua::Result<Self> {
        match value {
            Value::Table(t) => Ok(Store(t)),
            other => Err(expected("store", &other)),
        }
    }
}

/// A table (a store, say), or nil.
struct OptTable(Option<Table>);

impl FromLua for OptTable {
    fn from_lua(value: Value, _: &Lua) -> mlua::Result<Self> {
        match value {
            Value::Nil => Ok(OptTable(None)),
            Value::Table(t) => Ok(OptTable(Some(t))),
            other => Err(expected("table or nil", &other)),
        }
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

/// Plain data (`additional_data`), or nil: what a record can hold as JSON and read back.
struct Data(Option<serde_json::Value>);

impl FromLua for Data {
    fn from_lua(value: Value, lua: &Lua) -> mlua::Result<Self> {
        if value.is_nil() {
            return Ok(Data(None));
        }
        let mut budget = MAX_DATA_VALUES;
        if !data_within(&value, MAX_DATA_DEPTH, &mut budget)? {
            return Err(refused(format!(
                "plain data expected: at most {MAX_DATA_DEPTH} tables deep and \
                 {MAX_DATA_VALUES} values"
            )));
        }
        let options = DeserializeOptions::new().deny_unsupported_types(true);
        lua.from_value_with::<serde_json::Value>(value, options)
            .map(|data| Data(Some(data)))
            .map_err(|e| refused(format!("plain data expected: {e}")))
    }
}

/// An invite's `type`.
struct Kind(InviteKind);

impl FromLua for Kind {
    fn from_lua(value: Value, lua: &Lua) -> mlua::Result<Self> {
        match OptText::from_lua(value, lua)?.0.as_deref() {
            Some("register") => Ok(Kind(InviteKind::Register)),
            Some("roster") => Ok(Kind(InviteKind::Roster)),
            _ => Err(refused("\"register\" or \"roster\" expected")),
        }
    }
}

/// `max_uses`: nil, or a whole number from 1 to 2^32 - 1.
struct MaxUses(Option<u32>);

impl FromLua for MaxUses {
    fn from_lua(value: Value, lua: &Lua) -> mlua::Result<Self> {
        if value.is_nil() {
            return Ok(MaxUses(None));
        }
        match Integer::from_lua(value, lua).map(|Integer(n)| u32::try_from(n)) {
            Ok(Ok(n)) if n > 0 => Ok(MaxUses(Some(n))),
            _ => Err(refused("positive integer expected")),
        }
    }
}

/// What `create` is asked to make (its first argument), and who asks.
struct InviteSpec(NewInvite, Provenance);

impl FromLua for InviteSpec {
    fn from_lua(value: Value, lua: &Lua) -> mlua::Result<Self> {
        let TableArg(t) = TableArg::from_lua(value, lua)?;
        // Any whole number, as Prosody takes it: a negative ttl makes an expired invite.
        let Integer(ttl) = field(lua, &t, "ttl")?;
        let MaxUses(max_uses) = field(lua, &t, "max_uses")?;
        let Kind(kind) = field(lua, &t, "type")?;
        let jid = match field::<OptText>(lua, &t, "jid")?.0 {
            Some(jid) if !jid.is_empty() => jid,
            _ => return Err(refused_field("jid", "non-empty string expected")),
        };
        let Flag(allow_registration) = field(lua, &t, "allow_registration")?;
        let Data(additional_data) = field(lua, &t, "additional_data")?;
        let Flag(reusable) = field(lua, &t, "reusable")?;
        let OptText(username) = field(lua, &t, "username")?;
        let OptText(reset) = field(lua, &t, "reset")?;
        let OptText(inviter) = field(lua, &t, "inviter")?;
        let OptUsername(creator) = field(lua, &t, "creator")?;
        let Bounded::<MAX_SOURCE_LEN>(source) = field(lua, &t, "source")?;
        let Bounded::<MAX_NOTE_LEN>(note) = field(lua, &t, "note")?;
        Ok(InviteSpec(
            NewInvite {
                kind,
                jid,
                allow_registration,
                additional_data,
                ttl,
                reusable,
                max_uses,
                username,
                reset,
                inviter,
            },
            Provenance {
                creator,
                source,
                note,
            },
        ))
    }
}

/// What `edit` is asked to change (its second argument).
struct EditSpec(Edit);

impl FromLua for EditSpec {
    fn from_lua(value: Value, lua: &Lua) -> mlua::Result<Self> {
        let TableArg(t) = TableArg::from_lua(value, lua)?;
        let OptInteger(expires) = field(lua, &t, "expires")?;
        let MaxUses(max_uses) = field(lua, &t, "max_uses")?;
        let NoteChange(note) = field(lua, &t, "note")?;
        Ok(EditSpec(Edit {
            expires,
            max_uses: max_uses.and_then(NonZeroU32::new),
            note,
        }))
    }
}

/// The quota rule `charge` applies (its second argument).
struct RuleSpec(Rule);

impl FromLua for RuleSpec {
    fn from_lua(value: Value, lua: &Lua) -> mlua::Result<Self> {
        let TableArg(t) = TableArg::from_lua(value, lua)?;
        let OptLimit(limit) = field(lua, &t, "limit")?;
        let OptSeconds::<1>(period) = field(lua, &t, "period")?;
        let OptSeconds::<0>(wait) = field(lua, &t, "wait")?;
        Ok(RuleSpec(Rule {
            limit,
            period,
            wait,
        }))
    }
}

/// What `invite-created` handlers may change on the invite they are shown.
struct HandlerChanges {
    additional_data: Option<serde_json::Value>,
    landing_page: Option<String>,
}

impl FromLua for HandlerChanges {
    fn from_lua(value: Value, lua: &Lua) -> mlua::Result<Self> {
        let TableArg(invite) = TableArg::from_lua(value, lua)?;
        let Data(additional_data) = field(lua, &invite, "additional_data")?;
        let OptText(landing_page) = field(lua, &invite, "landing_page")?;
        Ok(HandlerChanges {
            additional_data,
            landing_page,
        })
    }
}

/// The registration that wants a use (`reserve`'s second argument; see `state::Claim`).
struct ClaimSpec {
    holder: String,
    username: String,
    account_exists: bool,
    validated_at: i64,
    lease_until: i64,
}

impl ClaimSpec {
    fn claim(&self) -> Claim<'_> {
        Claim {
            holder: &self.holder,
            username: &self.username,
            account_exists: self.account_exists,
            validated_at: self.validated_at,
            lease_until: self.lease_until,
        }
    }
}

impl FromLua for ClaimSpec {
    fn from_lua(value: Value, lua: &Lua) -> mlua::Result<Self> {
        let TableArg(t) = TableArg::from_lua(value, lua)?;
        // A missing holder or username is named as the argument, as it always was.
        let Text(holder) = Text::from_lua(t.raw_get("holder")?, lua)?;
        let Text(username) = Text::from_lua(t.raw_get("username")?, lua)?;
        let Flag(account_exists) = field(lua, &t, "account_exists")?;
        let Integer(validated_at) = field(lua, &t, "validated_at")?;
        let Integer(lease_until) = field(lua, &t, "lease_until")?;
        Ok(ClaimSpec {
            holder,
            username,
            account_exists,
            validated_at,
            lease_until,
        })
    }
}

/// An invite of Prosody's own store (`import_legacy`'s second argument), without
/// `contact_of` (its third).
struct LegacySpec(LegacyInvite);

impl FromLua for LegacySpec {
    fn from_lua(value: Value, lua: &Lua) -> mlua::Result<Self> {
        let TableArg(t) = TableArg::from_lua(value, lua)?;
        let Kind(kind) = field(lua, &t, "type")?;
        // A missing jid is named as the argument, as it always was.
        let Text(jid) = Text::from_lua(t.raw_get("jid")?, lua)?;
        let Flag(allow_registration) = field(lua, &t, "allow_registration")?;
        let Data(additional_data) = field(lua, &t, "additional_data")?;
        let Integer(created_at) = field(lua, &t, "created_at")?;
        let Integer(expires) = field(lua, &t, "expires")?;
        let Flag(reusable) = field(lua, &t, "reusable")?;
        let OptText(landing_page) = field(lua, &t, "landing_page")?;
        Ok(LegacySpec(LegacyInvite {
            kind,
            jid,
            allow_registration,
            additional_data,
            created_at,
            expires,
            reusable,
            contact_of: None,
            landing_page,
        }))
    }
}

/// `new`'s one argument: the host, its stores and callbacks, and how tokens are kept.
struct BookConfig {
    host: String,
    backend: LuaBackend,
    storage: TokenStorage,
}

impl FromLua for BookConfig {
    fn from_lua(value: Value, lua: &Lua) -> mlua::Result<Self> {
        let TableArg(t) = TableArg::from_lua(value, lua)?;
        let Host(host) = field(lua, &t, "host")?;
        let Store(invites) = field(lua, &t, "invites")?;
        let Store(names) = field(lua, &t, "names")?;
        let OptTable(accounts) = field(lua, &t, "accounts")?;
        let Callback(log) = field(lua, &t, "log")?;
        let Callback(account_exists) = field(lua, &t, "account_exists")?;
        // Atomic between processes: a compare-and-set the shim does in the database, or a
        // lock file; neither is atomic within this process only.
        let Callback(swap) = field(lua, &t, "swap")?;
        let OptText(lock_file) = field(lua, &t, "lock_file")?;
        let lock = lock_file.filter(|p| !p.is_empty()).map(|path| {
            Rc::new(FileLock {
                path: path.into(),
                file: RefCell::new(None),
                depth: Cell::new(0),
            })
        });
        // Per space, "swap", "lock" or nothing (atomic within this process only).
        let OptTable(modes) = field(lua, &t, "atomic")?;
        let mut atomic = [Atomic::Process, Atomic::Process, Atomic::Process];
        for space in [Space::Invites, Space::Names, Space::Accounts] {
            let mode: Option<String> = match &modes {
                Some(m) => m.get(space_name(space)).map_err(|_| {
                    refused_field(
                        "atomic",
                        "a table of \"swap\" or \"lock\" by space expected",
                    )
                })?,
                None => None,
            };
            atomic[space as usize] = match (mode.as_deref(), &swap, &lock) {
                (Some("swap"), Some(swap), _) => Atomic::CompareAndSet(swap.clone()),
                (Some("lock"), _, Some(lock)) => Atomic::FileLock(Rc::clone(lock)),
                (None, _, _) => Atomic::Process,
                _ => {
                    return Err(refused_field(
                        "atomic",
                        "\"swap\" needs swap, \"lock\" needs lock_file",
                    ))
                }
            };
        }
        // Sealed with a key file where one is named; "hash" keeps hashes only.
        let OptText(key_file) = field(lua, &t, "key_file")?;
        let OptText(token_storage) = field(lua, &t, "token_storage")?;
        let storage = match token_storage.as_deref() {
            Some("hash") => TokenStorage::Hash,
            None if key_file.is_none() => TokenStorage::Hash,
            Some("sealed") | None => match key_file {
                Some(path) if !path.is_empty() => TokenStorage::Sealed(path.into()),
                _ => {
                    return Err(refused_field(
                        "key_file",
                        "a path expected with token_storage \"sealed\"",
                    ))
                }
            },
            Some(_) => {
                return Err(refused_field(
                    "token_storage",
                    "\"sealed\" or \"hash\" expected",
                ))
            }
        };
        Ok(BookConfig {
            host,
            backend: LuaBackend {
                lua: lua.weak(),
                invites,
                names,
                accounts,
                log,
                account_exists,
                atomic,
            },
            storage,
        })
    }
}

/// A period option's value for `period`: seconds, text, or `false`. Anything else is no
/// period, an expected failure rather than misuse: it comes from the config.
enum PeriodValue {
    Seconds(f64),
    Text(String),
    Off,
    Not(&'static str),
}

impl FromLua for PeriodValue {
    fn from_lua(value: Value, _: &Lua) -> mlua::Result<Self> {
        Ok(match value {
            Value::Integer(i) => PeriodValue::Seconds(i as f64),
            Value::Number(n) => PeriodValue::Seconds(n),
            Value::Boolean(false) => PeriodValue::Off,
            Value::String(s) => PeriodValue::Text(s.to_string_lossy()),
            other => PeriodValue::Not(other.type_name()),
        })
    }
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
fn invite_table(lua: &Lua, hash: &TokenHash, r: &InviteRecord, now: i64) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.raw_set("id", hash.short_id())?;
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
    let status = r.status(now);
    t.raw_set("status", status.as_str())?;
    // Can still be used (pending, or held by a registration in flight).
    t.raw_set(
        "usable",
        matches!(status, Status::Pending | Status::Reserved),
    )?;
    t.raw_set("creator", r.creator.as_deref())?;
    t.raw_set("source", r.source.as_deref())?;
    t.raw_set("note", r.note.as_deref())?;
    let redemptions = lua.create_table_with_capacity(r.redemptions.len(), 0)?;
    for (i, redemption) in r.redemptions.iter().enumerate() {
        let entry = lua.create_table_with_capacity(0, 3)?;
        entry.raw_set("account", redemption.account.as_deref())?;
        entry.raw_set("at", redemption.at)?;
        entry.raw_set("reset", redemption.reset)?;
        redemptions.raw_set(i + 1, entry)?;
    }
    t.raw_set("redemptions", redemptions)?;
    Ok(t)
}

/// A redeemed invite, as `book:confirm()` gives it: what a registration says of it.
fn confirmed_table(lua: &Lua, hash: &TokenHash, r: &InviteRecord) -> mlua::Result<Table> {
    let t = lua.create_table_with_capacity(0, 5)?;
    t.raw_set("id", hash.short_id())?;
    t.raw_set("uses", r.uses)?;
    t.raw_set("max_uses", r.use_limit())?;
    t.raw_set("creator", r.creator.as_deref())?;
    t.raw_set("reset", r.reset.as_deref())?;
    Ok(t)
}

/// An account's entry in the invite tree, as `book:account()` gives it.
fn account_table(lua: &Lua, username: &str, e: &AccountEntry) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.raw_set("username", username)?;
    t.raw_set("by", e.by.as_deref())?;
    t.raw_set("source", e.source.as_deref())?;
    t.raw_set("invite", e.invite.as_deref())?;
    t.raw_set("registered", e.registered)?;
    t.raw_set("deleted", e.deleted)?;
    let invited = lua.create_sequence_from(e.invited.iter().map(String::as_str))?;
    t.raw_set("invited", invited)?;
    Ok(t)
}

/// An invite with its token, URI and landing page, as Prosody's store gives it.
fn with_token(
    lua: &Lua,
    hash: &TokenHash,
    record: &InviteRecord,
    token: &Token,
    now: i64,
) -> mlua::Result<Table> {
    let t = invite_table(lua, hash, record, now)?;
    t.raw_set("token", token.expose())?;
    t.raw_set("uri", record_uri(record, token))?;
    if let Some(page) = &record.landing_page {
        t.raw_set("landing_page", page.with_token(token))?;
    }
    Ok(t)
}

/// A stored invite for listings: with its token where it was sealed and opens, otherwise
/// with its handle (the key) as `token`, and no link.
fn listed_table(
    lua: &Lua,
    book: &Book<LuaBackend>,
    hash: &TokenHash,
    record: &InviteRecord,
    now: i64,
) -> mlua::Result<Table> {
    match book.token_of(hash, record) {
        Some(token) => with_token(lua, hash, record, &token, now),
        None => {
            let t = invite_table(lua, hash, record, now)?;
            t.raw_set("token", hash.key())?;
            Ok(t)
        }
    }
}

/// Runs a method body so that a Rust panic becomes `nil, "internal-server-error"` and one
/// error line in the log (naming the method only: a panic message could carry anything).
fn guarded<F>(lua: &Lua, book: &LuaBook, method: &str, body: F) -> mlua::Result<MultiValue>
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

// ---------------------------------------------------------------------------------------
// The book's methods. The token comes first and is looked at first: without one (nil, or
// not UTF-8) a method answers at once, before its other arguments are checked.

/// The book as Lua holds it (`core.new{…}`).
pub struct LuaBook(Book<LuaBackend>);

impl UserData for LuaBook {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        // Lua knows it as a book: `tostring(book)` reads "Book: 0x…".
        fields.add_meta_field("__name", "Book");
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("create", create);
        methods.add_method("prepare", prepare);
        methods.add_method("store", store);
        methods.add_method("get", get);
        methods.add_method("reserve", reserve);
        methods.add_method("confirm", confirm);
        methods.add_method("release", release);
        methods.add_method("resolve", resolve);
        methods.add_method("use", redeem);
        methods.add_method("revoke", revoke);
        methods.add_method("revoke_key", revoke_key);
        methods.add_method("prune", prune);
        methods.add_method("username_reserved", username_reserved);
        methods.add_method("listed", listed);
        methods.add_method("import_legacy", import_legacy);
        methods.add_method("edit", edit);
        methods.add_method("account", account);
        methods.add_method("entry_username", entry_username);
        methods.add_method("refund", refund);
        methods.add_method("account_registered", account_registered);
        methods.add_method("account_deleted", account_deleted);
        methods.add_method("revoke_by", revoke_by);
        methods.add_method("charge", charge);
    }
}

/// `book:create(spec, now)` → the invite with its token, stored, or `nil, error`.
fn create(lua: &Lua, book: &LuaBook, (spec, now): (Value, Value)) -> mlua::Result<MultiValue> {
    let TableArg(spec) = arg(lua, spec, 1, "create")?;
    let Integer(now) = arg(lua, now, 2, "create")?;
    let InviteSpec(new, provenance) = arg(lua, Value::Table(spec), 1, "create")?;
    guarded(lua, book, "create", || {
        let mut created = book.0.prepare_with(new, provenance, now);
        let invite = with_token(lua, &created.hash, &created.record, &created.token, now)?;
        match book.0.store_created(&mut created) {
            Ok(()) => success(lua, invite),
            Err(e) => failure(lua, e),
        }
    })
}

/// A new invite between `prepare` and `store`: its token stays here, in Rust.
pub struct LuaDraft(RefCell<Option<Created>>);

impl UserData for LuaDraft {}

/// A draft from `prepare`, taken: it is stored once.
struct DraftArg(Created);

impl FromLua for DraftArg {
    fn from_lua(value: Value, _lua: &Lua) -> mlua::Result<Self> {
        let Value::UserData(ud) = &value else {
            return Err(expected("draft from prepare", &value));
        };
        let draft = ud
            .borrow::<LuaDraft>()
            .map_err(|_| expected("draft from prepare", &value))?;
        let taken = draft.0.borrow_mut().take();
        taken
            .map(DraftArg)
            .ok_or_else(|| refused("a draft that was stored already"))
    }
}

/// `book:prepare(spec, now)` → the new invite with its token, and the draft to store it
/// with. Nothing is stored yet: Prosody fires `invite-created` in between (from Lua, so its
/// handlers may wait on I/O), and what they change is stored.
fn prepare(lua: &Lua, book: &LuaBook, (spec, now): (Value, Value)) -> mlua::Result<MultiValue> {
    let TableArg(spec) = arg(lua, spec, 1, "prepare")?;
    let Integer(now) = arg(lua, now, 2, "prepare")?;
    let InviteSpec(new, provenance) = arg(lua, Value::Table(spec), 1, "prepare")?;
    guarded(lua, book, "prepare", || {
        let created = book.0.prepare_with(new, provenance, now);
        let invite = with_token(lua, &created.hash, &created.record, &created.token, now)?;
        let draft = lua.create_userdata(LuaDraft(RefCell::new(Some(created))))?;
        success(lua, (invite, draft))
    })
}

/// `book:store(draft, invite)` → the invite, stored with the `additional_data` and
/// `landing_page` it has now, or `nil, error`. A draft is stored once.
fn store(lua: &Lua, book: &LuaBook, (draft, invite): (Value, Value)) -> mlua::Result<MultiValue> {
    let TableArg(table) = arg(lua, invite, 2, "store")?;
    let changes: HandlerChanges = arg(lua, Value::Table(table.clone()), 2, "store")?;
    let DraftArg(mut created) = arg(lua, draft, 1, "store")?;
    guarded(lua, book, "store", || {
        created.record.additional_data = changes.additional_data;
        created.record.landing_page = changes
            .landing_page
            .map(|url| LandingPage::without_token(&url, &created.token));
        match book.0.store_created(&mut created) {
            Ok(()) => success(lua, table),
            Err(e) => failure(lua, e),
        }
    })
}

/// `book:get(token, contact_of, host, now)` → the valid invite, with its token.
fn get(
    lua: &Lua,
    book: &LuaBook,
    (token, contact_of, host, now): (Value, Value, Value, Value),
) -> mlua::Result<MultiValue> {
    let presented = match arg::<TokenArg>(lua, token, 1, "get")?.0 {
        Ok(text) => text,
        Err(e) => return failure(lua, e),
    };
    let OptText(contact_of) = arg(lua, contact_of, 2, "get")?;
    let Text(host) = arg(lua, host, 3, "get")?;
    let Integer(now) = arg(lua, now, 4, "get")?;
    guarded(lua, book, "get", || {
        match book
            .0
            .validate(&presented, contact_of.as_deref(), &host, now)
        {
            Ok((token, found)) => {
                let t = with_token(lua, &found.hash, &found.record, &token, now)?;
                if let Some(user) = &contact_of {
                    t.raw_set("username", user.as_str())?;
                }
                success(lua, t)
            }
            Err(e) => failure(lua, e),
        }
    })
}

/// `book:reserve(token, claim, host, now)` → `true`, one use held for the claim. (Only
/// that: a registration asks nothing more of it, and builds no table it drops.)
fn reserve(
    lua: &Lua,
    book: &LuaBook,
    (token, claim, host, now): (Value, Value, Value, Value),
) -> mlua::Result<MultiValue> {
    let presented = match arg::<TokenArg>(lua, token, 1, "reserve")?.0 {
        Ok(text) => text,
        Err(e) => return failure(lua, e),
    };
    let TableArg(claim) = arg(lua, claim, 2, "reserve")?;
    let Text(host) = arg(lua, host, 3, "reserve")?;
    let Integer(now) = arg(lua, now, 4, "reserve")?;
    let claim: ClaimSpec = arg(lua, Value::Table(claim), 2, "reserve")?;
    guarded(lua, book, "reserve", || {
        match book.0.reserve(&presented, &claim.claim(), &host, now) {
            Ok(_) => success(lua, true),
            Err(e) => failure(lua, e),
        }
    })
}

/// `book:confirm(token, holder, host, now[, username])` → `{ id, uses, max_uses, creator,
/// reset }` of the invite (what the registration logs and tells its creator), the holder's
/// use redeemed, and the account it created entered in the invite tree. `username`
/// (optional) names the account registered, for when the holder's reservation lapsed and
/// no longer does.
fn confirm(
    lua: &Lua,
    book: &LuaBook,
    (token, holder, host, now, username): (Value, Value, Value, Value, Value),
) -> mlua::Result<MultiValue> {
    let presented = match arg::<TokenArg>(lua, token, 1, "confirm")?.0 {
        Ok(text) => text,
        Err(e) => return failure(lua, e),
    };
    let Text(holder) = arg(lua, holder, 2, "confirm")?;
    let Text(host) = arg(lua, host, 3, "confirm")?;
    let Integer(now) = arg(lua, now, 4, "confirm")?;
    let OptText(username) = arg(lua, username, 5, "confirm")?;
    guarded(lua, book, "confirm", || {
        match book
            .0
            .confirm_account(&presented, &holder, username.as_deref(), &host, now)
        {
            Ok(found) => success(lua, confirmed_table(lua, &found.hash, &found.record)?),
            Err(e) => failure(lua, e),
        }
    })
}

/// `book:release(token, holder, now)` → `"given-back"`, `"spent"` or `"nothing"`.
fn release(
    lua: &Lua,
    book: &LuaBook,
    (token, holder, now): (Value, Value, Value),
) -> mlua::Result<MultiValue> {
    let presented = match arg::<TokenArg>(lua, token, 1, "release")?.0 {
        Ok(text) => text,
        Err(e) => return failure(lua, e),
    };
    let Text(holder) = arg(lua, holder, 2, "release")?;
    let Integer(now) = arg(lua, now, 3, "release")?;
    guarded(lua, book, "release", || {
        match book.0.release(&presented, &holder, now) {
            Ok(released) => success(lua, released.as_str()),
            Err(e) => failure(lua, e),
        }
    })
}

/// `book:resolve(reference)` → the key of the invite an admin names by token, key or id.
fn resolve(lua: &Lua, book: &LuaBook, reference: Value) -> mlua::Result<MultiValue> {
    let Text(reference) = arg(lua, reference, 1, "resolve")?;
    guarded(lua, book, "resolve", || {
        let backend = book.0.backend();
        let walk = |visit: &mut dyn FnMut(&str) -> bool| {
            backend.each_key(Space::Invites, visit).map_err(|e| {
                backend.log(Level::Error, &format!("could not list invites: {e}"));
                InviteError::Storage
            })
        };
        match book.0.resolve(&reference, walk) {
            Ok(hash) => success(lua, hash.key()),
            Err(e) => failure(lua, e),
        }
    })
}

/// `book:use(token, contact_of, host, now[, account])` → the invite, one use redeemed for
/// `account` (optional: the account created, or the contact subscribing). Without
/// `contact_of`, that account was created with the invite and enters the invite tree.
fn redeem(
    lua: &Lua,
    book: &LuaBook,
    (token, contact_of, host, now, account): (Value, Value, Value, Value, Value),
) -> mlua::Result<MultiValue> {
    let presented = match arg::<TokenArg>(lua, token, 1, "use")?.0 {
        Ok(text) => text,
        Err(e) => return failure(lua, e),
    };
    let OptText(contact_of) = arg(lua, contact_of, 2, "use")?;
    let Text(host) = arg(lua, host, 3, "use")?;
    let Integer(now) = arg(lua, now, 4, "use")?;
    let OptText(account) = arg(lua, account, 5, "use")?;
    guarded(lua, book, "use", || {
        match book.0.redeem_account(
            &presented,
            contact_of.as_deref(),
            account.as_deref(),
            &host,
            now,
        ) {
            Ok(found) => success(lua, invite_table(lua, &found.hash, &found.record, now)?),
            Err(e) => failure(lua, e),
        }
    })
}

/// `book:revoke(token, now)` → the revoked invite.
fn revoke(lua: &Lua, book: &LuaBook, (token, now): (Value, Value)) -> mlua::Result<MultiValue> {
    let presented = match arg::<TokenArg>(lua, token, 1, "revoke")?.0 {
        Ok(text) => text,
        Err(e) => return failure(lua, e),
    };
    let Integer(now) = arg(lua, now, 2, "revoke")?;
    guarded(lua, book, "revoke", || {
        match book.0.revoke(&presented, now) {
            Ok(found) => success(lua, invite_table(lua, &found.hash, &found.record, now)?),
            Err(e) => failure(lua, e),
        }
    })
}

/// `book:revoke_key(key, now)` → the revoked invite.
fn revoke_key(lua: &Lua, book: &LuaBook, (key, now): (Value, Value)) -> mlua::Result<MultiValue> {
    let Key(hash) = arg(lua, key, 1, "revoke_key")?;
    let Integer(now) = arg(lua, now, 2, "revoke_key")?;
    guarded(lua, book, "revoke_key", || {
        let revoked = hash
            .ok_or(InviteError::TokenInvalid)
            .and_then(|hash| book.0.revoke_key(&hash, now));
        match revoked {
            Ok(found) => success(lua, invite_table(lua, &found.hash, &found.record, now)?),
            Err(e) => failure(lua, e),
        }
    })
}

/// `book:prune(key, now, keep)` → whether the record was removed.
fn prune(
    lua: &Lua,
    book: &LuaBook,
    (key, now, keep): (Value, Value, Value),
) -> mlua::Result<MultiValue> {
    let Key(hash) = arg(lua, key, 1, "prune")?;
    let Integer(now) = arg(lua, now, 2, "prune")?;
    let Integer(keep) = arg(lua, keep, 3, "prune")?;
    guarded(lua, book, "prune", || {
        let Some(hash) = hash else {
            return success(lua, false);
        };
        match book.0.prune(&hash, now, keep) {
            Ok(removed) => success(lua, removed),
            Err(e) => failure(lua, e),
        }
    })
}

/// `book:username_reserved(username, now)` → whether a pending invite holds the name.
fn username_reserved(
    lua: &Lua,
    book: &LuaBook,
    (username, now): (Value, Value),
) -> mlua::Result<MultiValue> {
    let Text(username) = arg(lua, username, 1, "username_reserved")?;
    let Integer(now) = arg(lua, now, 2, "username_reserved")?;
    guarded(lua, book, "username_reserved", || {
        match book.0.username_reserved(&username, now, None) {
            Ok(reserved) => success(lua, reserved),
            Err(e) => failure(lua, e),
        }
    })
}

/// `book:listed(key, now, with_link)` → the stored invite for listings (with its token and
/// link where it was sealed, unless `with_link` is false), or nil.
fn listed(
    lua: &Lua,
    book: &LuaBook,
    (key, now, with_link): (Value, Value, Value),
) -> mlua::Result<MultiValue> {
    let Key(hash) = arg(lua, key, 1, "listed")?;
    let Integer(now) = arg(lua, now, 2, "listed")?;
    // Opening a sealed token costs a decryption and puts the token in Lua's memory: only
    // for a listing that shows links (the default).
    let WithLink(with_link) = arg(lua, with_link, 3, "listed")?;
    guarded(lua, book, "listed", || {
        let Some(hash) = hash else {
            return success(lua, Value::Nil);
        };
        match book.0.listed(&hash, now) {
            Ok(Some(record)) if with_link => {
                success(lua, listed_table(lua, &book.0, &hash, &record, now)?)
            }
            Ok(Some(record)) => success(lua, invite_table(lua, &hash, &record, now)?),
            Ok(None) => success(lua, Value::Nil),
            Err(e) => failure(lua, e),
        }
    })
}

/// `book:import_legacy(token, legacy, contact_of, now)` → whether a record was written.
fn import_legacy(
    lua: &Lua,
    book: &LuaBook,
    (token, legacy, contact_of, now): (Value, Value, Value, Value),
) -> mlua::Result<MultiValue> {
    let token = match arg::<TokenArg>(lua, token, 1, "import_legacy")?.0 {
        Ok(text) => text,
        Err(e) => return failure(lua, e),
    };
    let TableArg(legacy) = arg(lua, legacy, 2, "import_legacy")?;
    let OptText(contact_of) = arg(lua, contact_of, 3, "import_legacy")?;
    let Integer(now) = arg(lua, now, 4, "import_legacy")?;
    let LegacySpec(mut legacy) = arg(lua, Value::Table(legacy), 2, "import_legacy")?;
    legacy.contact_of = contact_of;
    guarded(lua, book, "import_legacy", || {
        match book.0.import_legacy(&token, legacy, now) {
            Ok(imported) => success(lua, imported),
            Err(e) => failure(lua, e),
        }
    })
}

/// `book:edit(key, changes, now)` → the invite as changed, or `nil, error`. `changes` is
/// `{ expires = <unix time>?, max_uses = <integer ≥ 1>?, note = <string> | false? }`
/// (false removes the note). Refusals: `no-such-invite`, `token-revoked`, `token-used`,
/// `token-expired` (an expired invite changes only with a new `expires`), `invalid-expiry`
/// (not in the future), `single-account`, `uses-below-taken`.
fn edit(
    lua: &Lua,
    book: &LuaBook,
    (key, changes, now): (Value, Value, Value),
) -> mlua::Result<MultiValue> {
    let Key(hash) = arg(lua, key, 1, "edit")?;
    let TableArg(changes) = arg(lua, changes, 2, "edit")?;
    let Integer(now) = arg(lua, now, 3, "edit")?;
    let EditSpec(changes) = arg(lua, Value::Table(changes), 2, "edit")?;
    guarded(lua, book, "edit", || {
        let edited = hash
            .ok_or(InviteError::NoSuchInvite)
            .and_then(|hash| book.0.edit(&hash, &changes, now));
        match edited {
            Ok(found) => success(lua, invite_table(lua, &found.hash, &found.record, now)?),
            Err(e) => failure(lua, e),
        }
    })
}

/// `book:account(username)` → `{ username, by, source, invite, registered, deleted,
/// invited = { … } }`, the account's entry in the invite tree, or nil if it has none.
fn account(lua: &Lua, book: &LuaBook, username: Value) -> mlua::Result<MultiValue> {
    let Text(username) = arg(lua, username, 1, "account")?;
    guarded(lua, book, "account", || match book.0.account(&username) {
        Ok(Some(entry)) => success(lua, account_table(lua, &username, &entry)?),
        Ok(None) => success(lua, Value::Nil),
        Err(e) => failure(lua, e),
    })
}

/// `book:refund(username, at)` → true; gives back the charge made at `at` (the `now` given
/// to `charge`) when the invite it was for could not be made.
fn refund(lua: &Lua, book: &LuaBook, (username, at): (Value, Value)) -> mlua::Result<MultiValue> {
    for_account(lua, book, "refund", (username, at), |b, u, at| {
        b.refund(u, at).map(|()| true)
    })
}

/// `book:entry_username(key)` → the username a key of the accounts store names, or nil
/// (the store's keys are not bare usernames: see `record::entry_key`).
fn entry_username(lua: &Lua, _book: &LuaBook, key: Value) -> mlua::Result<MultiValue> {
    let Text(key) = arg(lua, key, 1, "entry_username")?;
    success(lua, crate::record::username_of_entry_key(&key))
}

/// `book:account_registered(username, now)` → true; notes an account registered without
/// an invite (an account the tree knows as registered is left as it is).
fn account_registered(
    lua: &Lua,
    book: &LuaBook,
    (username, now): (Value, Value),
) -> mlua::Result<MultiValue> {
    for_account(
        lua,
        book,
        "account_registered",
        (username, now),
        |b, u, now| b.account_registered(u, now).map(|()| true),
    )
}

/// The methods taking `(username, now)`: their arguments checked as `method`'s, then
/// `op`'s answer, or `nil, error`.
fn for_account<T: IntoLuaMulti>(
    lua: &Lua,
    book: &LuaBook,
    method: &str,
    (username, now): (Value, Value),
    op: impl FnOnce(&Book<LuaBackend>, &str, i64) -> Result<T, InviteError>,
) -> mlua::Result<MultiValue> {
    let Text(username) = arg(lua, username, 1, method)?;
    let Integer(now) = arg(lua, now, 2, method)?;
    guarded(lua, book, method, || match op(&book.0, &username, now) {
        Ok(answer) => success(lua, answer),
        Err(e) => failure(lua, e),
    })
}

/// `book:account_deleted(username, now)` → how many of its invites were revoked; the
/// account stays in the tree, marked deleted.
fn account_deleted(
    lua: &Lua,
    book: &LuaBook,
    (username, now): (Value, Value),
) -> mlua::Result<MultiValue> {
    for_account(
        lua,
        book,
        "account_deleted",
        (username, now),
        |b, u, now| b.account_deleted(u, now),
    )
}

/// `book:revoke_by(username, now)` → how many invites still to be had that `username` made
/// (or that are contact invites to it) were revoked.
fn revoke_by(
    lua: &Lua,
    book: &LuaBook,
    (username, now): (Value, Value),
) -> mlua::Result<MultiValue> {
    for_account(lua, book, "revoke_by", (username, now), |b, u, now| {
        b.revoke_by(u, now)
    })
}

/// `book:charge(username, rule, now)` → true, the invite about to be made counted against
/// the account's quota; or `nil, "too-soon" | "quota-exceeded", retry_at` (the time it may,
/// nil if never under this rule). `rule` is `{ limit = <integer ≥ 0>?, period = <seconds
/// ≥ 1>?, wait = <seconds ≥ 0>? }`.
fn charge(
    lua: &Lua,
    book: &LuaBook,
    (username, rule, now): (Value, Value, Value),
) -> mlua::Result<MultiValue> {
    let Text(username) = arg(lua, username, 1, "charge")?;
    let TableArg(rule) = arg(lua, rule, 2, "charge")?;
    let Integer(now) = arg(lua, now, 3, "charge")?;
    let RuleSpec(rule) = arg(lua, Value::Table(rule), 2, "charge")?;
    guarded(lua, book, "charge", || {
        match book.0.charge(&username, &rule, now) {
            Ok(()) => success(lua, true),
            Err(refusal) => {
                (Value::Nil, refusal.error.name(), refusal.retry_at).into_lua_multi(lua)
            }
        }
    })
}

// ---------------------------------------------------------------------------------------
// The preauth throttle.

/// Per-IP guessing limits (see `throttle.rs`), as Lua holds them (`core.throttle(…)`).
pub struct LuaThrottle(RefCell<Throttle>);

impl UserData for LuaThrottle {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("allows", allows);
        methods.add_method("retry_after", retry_after);
        methods.add_method("failed", failed);
        methods.add_method("tracked", |_, throttle, ()| {
            Ok(throttle.0.borrow().tracked())
        });
    }
}

/// `throttle:allows(address, now)` → whether `address` may try a token now.
fn allows(lua: &Lua, throttle: &LuaThrottle, (address, now): (Value, Value)) -> mlua::Result<bool> {
    let Text(address) = arg(lua, address, 1, "allows")?;
    let Integer(now) = arg(lua, now, 2, "allows")?;
    Ok(throttle.0.borrow().allows(&address, now))
}

/// `throttle:retry_after(address, now)` → seconds until `address` may try again, or nil.
fn retry_after(
    lua: &Lua,
    throttle: &LuaThrottle,
    (address, now): (Value, Value),
) -> mlua::Result<Option<i64>> {
    let Text(address) = arg(lua, address, 1, "retry_after")?;
    let Integer(now) = arg(lua, now, 2, "retry_after")?;
    Ok(throttle.0.borrow().retry_after(&address, now))
}

/// `throttle:failed(address, now)` → true; counts a failed try.
fn failed(lua: &Lua, throttle: &LuaThrottle, (address, now): (Value, Value)) -> mlua::Result<bool> {
    let Text(address) = arg(lua, address, 1, "failed")?;
    let Integer(now) = arg(lua, now, 2, "failed")?;
    throttle.0.borrow_mut().failed(&address, now);
    Ok(true)
}

// ---------------------------------------------------------------------------------------
// Exports.

/// The table `luaopen_prosody_invites` returns.
pub fn exports(lua: &Lua) -> mlua::Result<Table> {
    let exports = lua.create_table()?;
    exports.set("version", env!("CARGO_PKG_VERSION"))?;
    exports.set("new", lua.create_function(new_book)?)?;
    exports.set("throttle", lua.create_function(new_throttle)?)?;
    exports.set("period", lua.create_function(period)?)?;
    exports.set("parse_duration", lua.create_function(duration)?)?;
    exports.set("key_of", lua.create_function(key_of)?)?;
    Ok(exports)
}

/// `core.new(config)` → the book of one virtual host.
fn new_book(lua: &Lua, config: Value) -> mlua::Result<LuaBook> {
    let BookConfig {
        host,
        backend,
        storage,
    } = arg(lua, config, 1, "new")?;
    Ok(LuaBook(
        Book::new(backend, &host).with_token_storage(storage),
    ))
}

/// `core.throttle(max, period, capacity)` → a throttle.
fn new_throttle(
    lua: &Lua,
    (max, period, capacity): (Value, Value, Value),
) -> mlua::Result<LuaThrottle> {
    let Positive(max) = arg(lua, max, 1, "throttle")?;
    let Positive(period) = arg(lua, period, 2, "throttle")?;
    let Positive(capacity) = arg(lua, capacity, 3, "throttle")?;
    let max = u32::try_from(max).unwrap_or(u32::MAX);
    let capacity = usize::try_from(capacity).unwrap_or(usize::MAX);
    Ok(LuaThrottle(RefCell::new(Throttle::new(
        max, period, capacity,
    ))))
}

/// `core.period(value, min, can_be_off)` → seconds, nil for off, or `nil, why`.
fn period(lua: &Lua, (value, min, can_be_off): (Value, Value, Value)) -> mlua::Result<MultiValue> {
    let Integer(min) = arg(lua, min, 2, "period")?;
    let Flag(can_be_off) = arg(lua, can_be_off, 3, "period")?;
    let value: PeriodValue = arg(lua, value, 1, "period")?;
    let setting = match &value {
        PeriodValue::Seconds(n) => PeriodSetting::Seconds(*n),
        PeriodValue::Text(text) => PeriodSetting::Text(text),
        PeriodValue::Off => PeriodSetting::Off,
        PeriodValue::Not(type_name) => {
            return (Value::Nil, format!("a {type_name} is not a period")).into_lua_multi(lua)
        }
    };
    match period_setting(setting, min, can_be_off) {
        Ok(Some(seconds)) => seconds.into_lua_multi(lua),
        Ok(None) => Value::Nil.into_lua_multi(lua),
        Err(e) => (Value::Nil, e).into_lua_multi(lua),
    }
}

/// `core.parse_duration(text)` → seconds, or `nil, why`.
fn duration(lua: &Lua, text: Value) -> mlua::Result<MultiValue> {
    let Text(text) = arg(lua, text, 1, "parse_duration")?;
    match parse_duration(&text) {
        Ok(seconds) => (Value::Integer(seconds), Value::Nil).into_lua_multi(lua),
        Err(e) => (Value::Nil, e.to_string()).into_lua_multi(lua),
    }
}

/// `core.key_of(token)` → the key a token's invite is stored under, or `nil, error`.
fn key_of(lua: &Lua, token: Value) -> mlua::Result<MultiValue> {
    let Text(token) = arg(lua, token, 1, "key_of")?;
    match Token::parse(&token) {
        Ok(t) => (t.hash().key(), Value::Nil).into_lua_multi(lua),
        Err(e) => (Value::Nil, e.name()).into_lua_multi(lua),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_lock(path: &std::path::Path) -> FileLock {
        FileLock {
            path: path.to_owned(),
            file: RefCell::new(None),
            depth: Cell::new(0),
        }
    }

    /// Whether another open file (another process, for flock) could take the lock now.
    fn free(path: &std::path::Path) -> bool {
        let f = std::fs::File::open(path).unwrap();
        let free = f.try_lock().is_ok();
        let _ = f.unlock();
        free
    }

    #[test]
    fn the_lock_file_is_held_for_a_change_and_released_on_every_way_out() {
        let dir = std::env::temp_dir().join(format!("invites-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("invites.lock");
        let lock = file_lock(&path);
        {
            let _held = lock.hold().unwrap();
            assert!(!free(&path));
            {
                // A change inside a change (a name indexed during an edit) is inside it.
                let _inner = lock.hold().unwrap();
            }
            assert!(
                !free(&path),
                "the inner change released the outer one's lock"
            );
        }
        assert!(free(&path));
        // An error on the way out of a change releases it too.
        let failing = || -> Result<(), StoreError> {
            let _held = lock.hold()?;
            Err(StoreError::Contended)
        };
        assert!(failing().is_err());
        assert!(free(&path));
        // A lock file that cannot be opened is a storage error, not a change without lock.
        let nowhere = file_lock(&dir.join("missing").join("invites.lock"));
        assert!(matches!(nowhere.hold().err(), Some(StoreError::Backend(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }

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

    /// The message `arg` raises for `value` as argument `n` of `function`.
    fn raised<T: FromLua>(lua: &Lua, value: Value, n: usize, function: &str) -> String {
        match arg::<T>(lua, value, n, function) {
            Err(mlua::Error::RuntimeError(message)) => message,
            Err(other) => panic!("not a refusal: {other}"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn conversions_refuse_quiet_coercions_and_say_so_as_lua_does() -> mlua::Result<()> {
        let lua = Lua::new();
        let text = |t: &str| lua.create_string(t).map(Value::String);
        // Whole numbers only; a float only when it is one.
        assert_eq!(arg::<Integer>(&lua, Value::Number(3.0), 2, "create")?.0, 3);
        assert_eq!(
            raised::<Integer>(&lua, Value::Number(1.5), 2, "create"),
            "bad argument #2 to 'create' (integer expected, got number)"
        );
        for not_whole in [f64::NAN, f64::INFINITY, 2f64.powi(63)] {
            raised::<Integer>(&lua, Value::Number(not_whole), 4, "get");
        }
        assert_eq!(
            raised::<Integer>(&lua, text("1")?, 2, "create"),
            "bad argument #2 to 'create' (integer expected, got string)"
        );
        // No number for a string, no truthiness for a boolean.
        assert_eq!(
            raised::<Text>(&lua, Value::Integer(42), 3, "reserve"),
            "bad argument #3 to 'reserve' (string expected, got integer)"
        );
        assert_eq!(
            raised::<OptText>(&lua, Value::Boolean(true), 2, "get"),
            "bad argument #2 to 'get' (string or nil expected, got boolean)"
        );
        assert_eq!(
            raised::<Flag>(&lua, Value::Integer(1), 3, "period"),
            "bad argument #3 to 'period' (boolean or nil expected, got integer)"
        );
        assert!(!arg::<Flag>(&lua, Value::Nil, 3, "period")?.0);
        assert_eq!(
            raised::<Positive>(&lua, Value::Integer(0), 1, "throttle"),
            "bad argument #1 to 'throttle' (positive integer expected, got integer)"
        );
        assert_eq!(
            raised::<Callback>(&lua, text("f")?, 3, "create"),
            "bad argument #3 to 'create' (function or nil expected, got string)"
        );
        // A token: nil and text that is not UTF-8 are answers, not misuse.
        let token = |v| arg::<TokenArg>(&lua, v, 1, "get").map(|t| t.0.err());
        assert_eq!(token(Value::Nil)?, Some(InviteError::NoToken));
        assert_eq!(
            token(Value::String(lua.create_string([0xff, 0xfe])?))?,
            Some(InviteError::TokenInvalid)
        );
        assert_eq!(token(text("")?)?, None);
        assert_eq!(
            raised::<TokenArg>(&lua, Value::Integer(42), 1, "get"),
            "bad argument #1 to 'get' (string expected, got integer)"
        );
        // A key: text that is no key names no invite.
        assert!(arg::<Key>(&lua, text("zz")?, 1, "listed")?.0.is_none());
        let key = Token::parse("t").unwrap().hash().key();
        assert!(arg::<Key>(&lua, text(&key)?, 1, "listed")?.0.is_some());
        assert!(arg::<Key>(&lua, text(&key.to_uppercase())?, 1, "listed")?
            .0
            .is_none());
        Ok(())
    }

    #[test]
    fn a_table_argument_names_the_field_that_is_wrong() -> mlua::Result<()> {
        let lua = Lua::new();
        let spec = |fields: &str| -> mlua::Result<Value> {
            lua.load(format!(
                "return {{ type = 'register', jid = 'example.com', ttl = 60, {fields} }}"
            ))
            .eval()
        };
        let create = |fields: &str| raised::<InviteSpec>(&lua, spec(fields).unwrap(), 1, "create");
        assert_eq!(
            create("ttl = 1.5"),
            "bad field 'ttl' in argument to 'create' (integer expected, got number)"
        );
        for max_uses in ["0", "1.5", "2^32", "'3'"] {
            assert_eq!(
                create(&format!("max_uses = {max_uses}")),
                "bad field 'max_uses' in argument to 'create' (positive integer expected)"
            );
        }
        assert_eq!(
            create("type = 'other'"),
            "bad field 'type' in argument to 'create' (\"register\" or \"roster\" expected)"
        );
        assert_eq!(
            create("type = 5"),
            "bad field 'type' in argument to 'create' (string or nil expected, got integer)"
        );
        assert_eq!(
            create("jid = ''"),
            "bad field 'jid' in argument to 'create' (non-empty string expected)"
        );
        assert_eq!(
            create("reusable = 'yes'"),
            "bad field 'reusable' in argument to 'create' (boolean or nil expected, got string)"
        );
        assert!(create("additional_data = { f = print }").starts_with(
            "bad field 'additional_data' in argument to 'create' (plain data expected: "
        ));
        let InviteSpec(new, _) = arg(&lua, spec("max_uses = 3.0, reusable = true")?, 1, "create")?;
        assert_eq!((new.max_uses, new.reusable, new.ttl), (Some(3), true, 60));

        // A claim's holder and username are named as the argument, its other fields as fields.
        let claim = |t: &str| {
            let value = lua.load(format!("return {{ {t} }}")).eval().unwrap();
            raised::<ClaimSpec>(&lua, value, 2, "reserve")
        };
        assert_eq!(
            claim("username = 'x'"),
            "bad argument #2 to 'reserve' (string expected, got nil)"
        );
        assert_eq!(
            claim("holder = 'h', username = 'x', validated_at = 'soon', lease_until = 1"),
            "bad field 'validated_at' in argument to 'reserve' (integer expected, got string)"
        );
        assert_eq!(
            claim("holder = 'h', username = 'x', account_exists = 1"),
            "bad field 'account_exists' in argument to 'reserve' (boolean or nil expected, got integer)"
        );

        let config = |t: &str| {
            let value = lua.load(format!("return {{ {t} }}")).eval().unwrap();
            raised::<BookConfig>(&lua, value, 1, "new")
        };
        assert_eq!(
            config("host = 'example.com', names = {}"),
            "bad field 'invites' in argument to 'new' (store expected, got nil)"
        );
        assert_eq!(
            config("host = '', invites = {}, names = {}"),
            "bad field 'host' in argument to 'new' (non-empty string expected, got string)"
        );
        assert_eq!(
            config("host = 'h', invites = {}, names = {}, token_storage = 'sealed'"),
            "bad field 'key_file' in argument to 'new' (a path expected with token_storage \"sealed\")"
        );
        assert_eq!(
            config("host = 'h', invites = {}, names = {}, token_storage = 'plain'"),
            "bad field 'token_storage' in argument to 'new' (\"sealed\" or \"hash\" expected)"
        );
        Ok(())
    }

    #[test]
    fn arguments_are_checked_in_order_and_a_missing_token_is_answered_first() -> mlua::Result<()> {
        let lua = Lua::new();
        book_with_breakable_store(&lua)?;
        let answers: Vec<String> = lua
            .load(
                r#"
                local function answer(...)
                    local ok, a, b = pcall(...)
                    return ok and tostring(a) .. " " .. tostring(b) or tostring(a):match("^[^\n]*")
                end
                return {
                    -- No token: answered before the other (wrong) arguments are looked at.
                    answer(book.get, book, nil, 5, nil, "x"),
                    answer(book.release, book, "\255", nil, nil),
                    -- Text that cannot be a token is answered where the token is looked at:
                    -- after the host.
                    answer(book.get, book, "", nil, "b.example.com", 1700000001),
                    answer(book.get, book, "", nil, "example.com", 1700000001),
                    answer(book.get, book, ("x"):rep(1025), nil, "example.com", 1700000001),
                    -- A spec's fields after the arguments that follow it.
                    answer(book.create, book, { type = "register", jid = "example.com", ttl = 1.5 }, 1.5),
                    answer(book.create, book, "spec", 1.5),
                }
                "#,
            )
            .eval()?;
        assert_eq!(
            answers,
            [
                "nil no-token",
                "nil token-invalid",
                "nil wrong-host",
                "nil no-token",
                "nil token-invalid",
                "runtime error: bad argument #2 to 'create' (integer expected, got number)",
                "runtime error: bad argument #1 to 'create' (table expected, got string)",
            ]
        );
        Ok(())
    }

    #[test]
    fn a_string_that_is_no_key_names_no_invite() -> mlua::Result<()> {
        let lua = Lua::new();
        book_with_breakable_store(&lua)?;
        let (listed, pruned, revoked, name): (Value, bool, String, String) = lua
            .load(
                r#"
                local _, revoked = book:revoke_key("zz", 1700000001)
                return book:listed("zz", 1700000001), book:prune("zz", 1700000001, 0), revoked,
                    tostring(book)
                "#,
            )
            .eval()?;
        assert!(listed.is_nil());
        assert!(!pruned);
        assert_eq!(revoked, "token-invalid");
        assert!(name.starts_with("Book: "), "{name}");
        Ok(())
    }

    /// A book over in-Lua stores that can be walked (`users`), with the invite tree's store
    /// if `with_accounts`; its log lines go to the global `lines`.
    fn governed_book(lua: &Lua, with_accounts: bool) -> mlua::Result<()> {
        lua.globals().set("core", exports(lua)?)?;
        lua.globals().set("with_accounts", with_accounts)?;
        lua.load(
            r#"
            lines = {}
            now = 1700000000
            local function memory()
                local data = {}
                return {
                    get = function (_, owner) return data[owner] end;
                    set = function (_, owner, value) data[owner] = value; return true end;
                    users = function () return next, data, nil end;
                }
            end
            accounts = {}
            book = core.new({ host = "example.com", invites = memory(), names = memory(),
                accounts = with_accounts and memory() or nil,
                account_exists = function (username) return accounts[username] == true end,
                log = function (level, message) lines[#lines + 1] = level .. ": " .. message end })
            function register(token, holder, username)
                assert(book:reserve(token, { holder = holder, username = username,
                    validated_at = now, lease_until = now + 60 }, "example.com", now))
                accounts[username] = true
                return assert(book:confirm(token, holder, "example.com", now))
            end
            "#,
        )
        .exec()
    }

    #[test]
    fn invites_show_provenance_note_and_redemptions_and_the_tree_who_invited_whom(
    ) -> mlua::Result<()> {
        let lua = Lua::new();
        governed_book(&lua, true)?;
        let checks: Vec<String> = lua
            .load(
                r#"
                local invite = assert(book:create({ type = "register", jid = "example.com",
                    allow_registration = true, ttl = 3600, max_uses = 2, creator = "alice",
                    source = "admin@example.com/res", note = "for the choir" }, now))
                local confirmed = register(invite.token, "h1", "bob")
                local key = core.key_of(invite.token)
                local listed = book:listed(key, now, false)
                local r = listed.redemptions
                local bob, alice = book:account("bob"), book:account("alice")
                return {
                    listed.creator, listed.source, listed.note,
                    tostring(#r), r[1].account, tostring(r[1].at == now), tostring(r[1].reset),
                    tostring(confirmed.uses),
                    bob.username, bob.by, bob.source, tostring(bob.invite == invite.id),
                    tostring(bob.registered == now), tostring(bob.deleted),
                    table.concat(alice.invited, ","), tostring(alice.registered),
                    tostring(book:account("nobody")),
                }
                "#,
            )
            .eval()?;
        assert_eq!(
            checks,
            [
                "alice",
                "admin@example.com/res",
                "for the choir",
                "1",
                "bob",
                "true",
                "false",
                "1",
                "bob",
                "alice",
                "admin@example.com/res",
                "true",
                "true",
                "nil",
                "bob",
                "nil",
                "nil",
            ]
        );
        Ok(())
    }

    #[test]
    fn edit_and_its_refusals_through_lua() -> mlua::Result<()> {
        let lua = Lua::new();
        governed_book(&lua, true)?;
        let answers: Vec<String> = lua
            .load(
                r#"
                local function answer(...)
                    local a, b = ...
                    if type(a) == "table" then
                        return ("%s %s/%s %s"):format(a.status, a.uses, tostring(a.max_uses),
                            tostring(a.note))
                    end
                    return tostring(a) .. " " .. tostring(b)
                end
                local invite = assert(book:create({ type = "register", jid = "example.com",
                    allow_registration = true, ttl = 3600 }, now))
                local key = core.key_of(invite.token)
                assert(book:reserve(invite.token, { holder = "a", username = "alice",
                    validated_at = now, lease_until = now + 60 }, "example.com", now))
                local bound = assert(book:create({ type = "register", jid = "zed@example.com",
                    allow_registration = true, ttl = 3600, username = "zed" }, now))
                return {
                    answer(book:edit(key, { max_uses = 3, note = "three" }, now)),
                    answer(book:edit(key, { note = false }, now)),
                    answer(book:edit(key, { max_uses = 1 }, now)),
                    answer(book:edit(key, { expires = now }, now)),
                    answer(book:edit(key, {}, now + 3601)),
                    answer(book:edit(key, { expires = now + 7200 }, now + 3601)),
                    answer(book:edit(core.key_of(bound.token), { max_uses = 2 }, now)),
                    answer(book:edit("zz", {}, now)),
                    answer(book:edit(("0"):rep(64), {}, now)),
                }
                "#,
            )
            .eval()?;
        assert_eq!(
            answers,
            [
                "pending 0/3 three",
                "pending 0/3 nil",
                // One use is held: one in all leaves none to take.
                "reserved 0/1 nil",
                "nil invalid-expiry",
                "nil token-expired",
                "pending 0/1 nil",
                "nil single-account",
                "nil no-such-invite",
                "nil no-such-invite",
            ]
        );
        // Revived past the held use's lease: it lapsed, the use came back.
        Ok(())
    }

    #[test]
    fn charge_deleted_and_revoke_by_through_lua() -> mlua::Result<()> {
        let lua = Lua::new();
        governed_book(&lua, true)?;
        let answers: Vec<String> = lua
            .load(
                r#"
                local function answer(...)
                    return table.concat({ tostring((select(1, ...))), tostring((select(2, ...))),
                        tostring((select(3, ...))) }, " ")
                end
                local rule = { limit = 1, period = 86400, wait = 3600 }
                local out = {
                    answer(book:charge("alice", rule, now)),
                    answer(book:charge("alice", rule, now + 1)),
                    answer(book:charge("alice", { limit = 0 }, now)),
                    answer(book:charge("alice", {}, now)),
                    -- Both charges at `now` given back (the last one counted with no rule).
                    answer(book:refund("alice", now)),
                    answer(book:refund("alice", now)),
                    answer(book:charge("alice", rule, now + 2)),
                }
                assert(book:account_registered("newbie", now))
                out[#out + 1] = answer(book:charge("newbie", rule, now + 10))
                for _ = 1, 2 do
                    assert(book:create({ type = "register", jid = "example.com", ttl = 3600,
                        allow_registration = true, creator = "alice" }, now))
                end
                assert(book:create({ type = "roster", jid = "bob@example.com", ttl = 3600,
                    inviter = "bob" }, now))
                out[#out + 1] = answer(book:revoke_by("bob", now))
                out[#out + 1] = answer(book:account_deleted("alice", now))
                out[#out + 1] = answer(book:account_deleted("alice", now))
                out[#out + 1] = tostring(book:account("alice").deleted == now)
                return out
                "#,
            )
            .eval()?;
        assert_eq!(
            answers,
            [
                "true nil nil",
                "nil quota-exceeded 1700086400",
                "nil quota-exceeded nil",
                "true nil nil",
                "true nil nil",
                "true nil nil",
                "true nil nil",
                "nil too-soon 1700003600",
                "1 nil nil",
                "2 nil nil",
                "0 nil nil",
                "true",
            ]
        );
        Ok(())
    }

    #[test]
    fn without_an_accounts_store_the_tree_is_empty_and_logs_nothing() -> mlua::Result<()> {
        let lua = Lua::new();
        governed_book(&lua, false)?;
        let (answers, lines): (Vec<String>, Vec<String>) = lua
            .load(
                r#"
                local invite = assert(book:create({ type = "register", jid = "example.com",
                    allow_registration = true, ttl = 3600, creator = "alice" }, now))
                register(invite.token, "h", "bob")
                local second = assert(book:create({ type = "register", jid = "example.com",
                    allow_registration = true, ttl = 3600, creator = "alice" }, now))
                local out = {
                    tostring(book:account("bob")),
                    tostring(book:account_registered("carol", now)),
                    tostring(book:charge("alice", { limit = 1, period = 60 }, now)),
                    tostring(book:charge("alice", { limit = 1, period = 60 }, now)),
                    tostring(book:account_deleted("alice", now)),
                    assert(book:get(invite.token, nil, "example.com", now) == nil) and "used" or "?",
                }
                return out, lines
                "#,
            )
            .eval()?;
        assert_eq!(answers, ["nil", "true", "true", "true", "1", "used"]);
        assert!(lines.iter().all(|l| l.starts_with("debug: ")), "{lines:?}");
        Ok(())
    }

    #[test]
    fn governance_arguments_name_the_field_that_is_wrong() -> mlua::Result<()> {
        let lua = Lua::new();
        governed_book(&lua, true)?;
        let messages: Vec<String> = lua
            .load(
                r#"
                local function raised(...)
                    local ok, e = pcall(...)
                    return ok and "accepted" or tostring(e):match("^[^\n]*")
                end
                local spec = function (extra)
                    local t = { type = "register", jid = "example.com", ttl = 60 }
                    for k, v in pairs(extra) do t[k] = v end
                    return t
                end
                local key = core.key_of(assert(book:create(spec({}), now)).token)
                return {
                    raised(book.create, book, spec({ source = ("s"):rep(257) }), now),
                    raised(book.create, book, spec({ source = ("s"):rep(256) }), now),
                    raised(book.create, book, spec({ note = ("n"):rep(1025) }), now),
                    raised(book.prepare, book, spec({ creator = 5 }), now),
                    raised(book.create, book, spec({ creator = "" }), now),
                    raised(book.edit, book, key, { note = true }, now),
                    raised(book.edit, book, key, { max_uses = 0 }, now),
                    raised(book.edit, book, key, { expires = "soon" }, now),
                    raised(book.edit, book, key, nil, now),
                    raised(book.charge, book, "alice", { limit = -1 }, now),
                    raised(book.charge, book, "alice", { period = 0 }, now),
                    raised(book.charge, book, "alice", { wait = 1.5 }, now),
                    raised(book.account_deleted, book, nil, now),
                    raised(book.confirm, book, "t", "h", "example.com", now, 5),
                }
                "#,
            )
            .eval()?;
        assert_eq!(
            messages,
            [
                "runtime error: bad field 'source' in argument to 'create' (string of at most 256 bytes expected, got 257 bytes)",
                "accepted",
                "runtime error: bad field 'note' in argument to 'create' (string of at most 1024 bytes expected, got 1025 bytes)",
                "runtime error: bad field 'creator' in argument to 'prepare' (string or nil expected, got integer)",
                "runtime error: bad field 'creator' in argument to 'create' (non-empty string or nil expected)",
                "runtime error: bad field 'note' in argument to 'edit' (string, false or nil expected, got boolean)",
                "runtime error: bad field 'max_uses' in argument to 'edit' (positive integer expected)",
                "runtime error: bad field 'expires' in argument to 'edit' (integer or nil expected, got string)",
                "runtime error: bad argument #2 to 'edit' (table expected, got nil)",
                "runtime error: bad field 'limit' in argument to 'charge' (integer from 0 to 4294967295 or nil expected)",
                "runtime error: bad field 'period' in argument to 'charge' (integer of at least 1 or nil expected)",
                "runtime error: bad field 'wait' in argument to 'charge' (integer or nil expected, got number)",
                "runtime error: bad argument #1 to 'account_deleted' (string expected, got nil)",
                "runtime error: bad argument #5 to 'confirm' (string or nil expected, got integer)",
            ]
        );
        Ok(())
    }
}
