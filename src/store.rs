//! The narrow storage interface the Lua shim hands to the core.
//!
//! The core decides keys, encoding and the read-check-write sequence; the backend (a
//! Prosody keyval store in production, a map in tests) only moves opaque strings.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

use crate::error::StoreError;

/// The stores the core writes (see `record.rs` for what each holds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Space {
    Invites,
    Names,
    /// The invite tree and quotas. A host may have none: then reads find nothing and
    /// writes keep nothing.
    Accounts,
}

/// Severity of a message the core wants the host to log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

/// What the core needs from its host: one string slot per (space, owner), and a log.
pub trait Backend {
    fn get(&self, space: Space, owner: &str) -> Result<Option<String>, StoreError>;
    /// `None` removes the slot.
    fn put(&self, space: Space, owner: &str, value: Option<&str>) -> Result<(), StoreError>;
    /// Calls `visit` with each owner of `space` until it says stop (returns false).
    fn each_key(&self, space: Space, visit: &mut dyn FnMut(&str) -> bool)
        -> Result<(), StoreError>;
    /// Log messages never contain tokens; the core guarantees that, not the backend.
    fn log(&self, level: Level, message: &str);
    /// Whether an account exists (to settle reservations a crash left behind).
    fn account_exists(&self, username: &str) -> Result<bool, StoreError>;
}

impl<T: Backend + ?Sized> Backend for &T {
    fn get(&self, space: Space, owner: &str) -> Result<Option<String>, StoreError> {
        (**self).get(space, owner)
    }
    fn put(&self, space: Space, owner: &str, value: Option<&str>) -> Result<(), StoreError> {
        (**self).put(space, owner, value)
    }
    fn each_key(
        &self,
        space: Space,
        visit: &mut dyn FnMut(&str) -> bool,
    ) -> Result<(), StoreError> {
        (**self).each_key(space, visit)
    }
    fn log(&self, level: Level, message: &str) {
        (**self).log(level, message)
    }
    fn account_exists(&self, username: &str) -> Result<bool, StoreError> {
        (**self).account_exists(username)
    }
}

/// In-memory backend for tests and benchmarks, with optional fault injection.
#[derive(Default)]
pub struct MemoryBackend {
    pub slots: RefCell<BTreeMap<(Space, String), String>>,
    pub logs: RefCell<Vec<(Level, String)>>,
    /// Fail one operation after this many more succeed (`None`: never), then work again.
    pub fail_after: Cell<Option<usize>>,
    /// Once `fail_after` has failed an operation, fail every later one too (a store gone).
    pub stay_failed: Cell<bool>,
    pub ops: Cell<usize>,
    /// Accounts that exist, as far as `account_exists` is concerned.
    pub accounts: RefCell<std::collections::BTreeSet<String>>,
}

impl MemoryBackend {
    pub fn new() -> MemoryBackend {
        MemoryBackend::default()
    }

    fn tick(&self) -> Result<(), StoreError> {
        self.ops.set(self.ops.get() + 1);
        match self.fail_after.get() {
            Some(0) => {
                if !self.stay_failed.get() {
                    self.fail_after.set(None);
                }
                Err(StoreError::Backend(String::from("injected failure")))
            }
            Some(n) => {
                self.fail_after.set(Some(n - 1));
                Ok(())
            }
            None => Ok(()),
        }
    }

    pub fn count(&self, space: Space) -> usize {
        self.slots
            .borrow()
            .keys()
            .filter(|(s, _)| *s == space)
            .count()
    }

    pub fn raw(&self, space: Space, owner: &str) -> Option<String> {
        self.slots.borrow().get(&(space, owner.to_owned())).cloned()
    }

    pub fn set_raw(&self, space: Space, owner: &str, value: &str) {
        self.slots
            .borrow_mut()
            .insert((space, owner.to_owned()), value.to_owned());
    }
}

impl Backend for MemoryBackend {
    fn get(&self, space: Space, owner: &str) -> Result<Option<String>, StoreError> {
        self.tick()?;
        Ok(self.raw(space, owner))
    }

    fn put(&self, space: Space, owner: &str, value: Option<&str>) -> Result<(), StoreError> {
        self.tick()?;
        let mut slots = self.slots.borrow_mut();
        match value {
            Some(v) => {
                slots.insert((space, owner.to_owned()), v.to_owned());
            }
            None => {
                slots.remove(&(space, owner.to_owned()));
            }
        }
        Ok(())
    }

    fn each_key(
        &self,
        space: Space,
        visit: &mut dyn FnMut(&str) -> bool,
    ) -> Result<(), StoreError> {
        self.tick()?;
        // A copy: the visitor may write to the store it walks.
        let owners: Vec<String> = self
            .slots
            .borrow()
            .keys()
            .filter(|(s, _)| *s == space)
            .map(|(_, owner)| owner.clone())
            .collect();
        for owner in &owners {
            if !visit(owner) {
                break;
            }
        }
        Ok(())
    }

    fn log(&self, level: Level, message: &str) {
        self.logs.borrow_mut().push((level, message.to_owned()));
    }

    fn account_exists(&self, username: &str) -> Result<bool, StoreError> {
        Ok(self.accounts.borrow().contains(username))
    }
}
