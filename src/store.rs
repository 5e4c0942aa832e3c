//! The narrow storage interface the Lua shim hands to the core.
//!
//! The core decides keys, encoding and the read-check-write sequence; the backend (a
//! Prosody keyval store in production, a map in tests) only moves opaque strings.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

use crate::error::{StoreError, UPDATE_ATTEMPTS};

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

/// What `Backend::update` is to do with the value it read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// Nothing: the slot stays as it was read.
    Keep,
    Put(String),
    Remove,
}

impl Write {
    fn value(&self) -> Option<&str> {
        match self {
            Write::Put(v) => Some(v),
            _ => None,
        }
    }
}

/// What the core needs from its host: one string slot per (space, owner), and a log.
pub trait Backend {
    fn get(&self, space: Space, owner: &str) -> Result<Option<String>, StoreError>;
    /// `None` removes the slot.
    fn put(&self, space: Space, owner: &str, value: Option<&str>) -> Result<(), StoreError>;
    /// One read-check-write of a slot: reads it, asks `decide` what to write, and writes
    /// that unless another writer changed the slot since the read, in this process or in
    /// another sharing the storage; then it reads again and asks again (at most
    /// `UPDATE_ATTEMPTS` times, then `StoreError::Contended`). So `decide` may be called
    /// more than once, and only its last answer counts. Returns whether it wrote.
    ///
    /// This default holds within one process only (Prosody runs one thing at a time);
    /// backends that can lock or compare-and-set across processes override it.
    fn update(
        &self,
        space: Space,
        owner: &str,
        decide: &mut dyn FnMut(Option<&str>) -> Write,
    ) -> Result<bool, StoreError> {
        read_decide_write(self, space, owner, decide)
    }
    /// Stores `value` for `owner` unless something is stored there already (by this
    /// process or another); whether it did. One `update` that writes only over nothing;
    /// a compare-and-set backend needs no read first.
    fn insert(&self, space: Space, owner: &str, value: &str) -> Result<bool, StoreError> {
        self.update(space, owner, &mut |stored| match stored {
            None => Write::Put(value.to_owned()),
            Some(_) => Write::Keep,
        })
    }
    /// Whether writes to `space` are kept (a host may have no store for the invite tree).
    fn keeps(&self, _space: Space) -> bool {
        true
    }
    /// Calls `visit` with each owner of `space` until it says stop (returns false).
    fn each_key(&self, space: Space, visit: &mut dyn FnMut(&str) -> bool)
        -> Result<(), StoreError>;
    /// Log messages never contain tokens; the core guarantees that, not the backend.
    fn log(&self, level: Level, message: &str);
    /// Whether an account exists (to settle reservations a crash left behind).
    fn account_exists(&self, username: &str) -> Result<bool, StoreError>;
}

/// `Backend::update` with nothing to keep other processes out: read, decide, write.
pub fn read_decide_write<B: Backend + ?Sized>(
    backend: &B,
    space: Space,
    owner: &str,
    decide: &mut dyn FnMut(Option<&str>) -> Write,
) -> Result<bool, StoreError> {
    let current = backend.get(space, owner)?;
    match decide(current.as_deref()) {
        Write::Keep => Ok(false),
        write => backend.put(space, owner, write.value()).map(|()| true),
    }
}

/// A compare-and-set: `(expected, new)` → whether the slot held `expected` and now `new`.
pub type Swap<'a> = dyn FnMut(Option<&str>, Option<&str>) -> Result<bool, StoreError> + 'a;

/// `Backend::update` over a compare-and-set: `swap(expected, new)` stores `new` (`None`
/// removes) only if the slot still holds `expected`, and says whether it did. Reads, decides,
/// swaps; when another writer got in first, reads again (at most `UPDATE_ATTEMPTS` times).
/// A decision that changes nothing writes nothing.
pub fn update_by_swap<B: Backend + ?Sized>(
    backend: &B,
    space: Space,
    owner: &str,
    decide: &mut dyn FnMut(Option<&str>) -> Write,
    swap: &mut Swap<'_>,
) -> Result<bool, StoreError> {
    for _ in 0..UPDATE_ATTEMPTS {
        let current = backend.get(space, owner)?;
        let new = match decide(current.as_deref()) {
            Write::Keep => return Ok(false),
            Write::Put(v) => Some(v),
            Write::Remove => None,
        };
        if new == current || swap(current.as_deref(), new.as_deref())? {
            return Ok(true);
        }
    }
    Err(StoreError::Contended)
}

impl<T: Backend + ?Sized> Backend for &T {
    fn get(&self, space: Space, owner: &str) -> Result<Option<String>, StoreError> {
        (**self).get(space, owner)
    }
    fn put(&self, space: Space, owner: &str, value: Option<&str>) -> Result<(), StoreError> {
        (**self).put(space, owner, value)
    }
    fn update(
        &self,
        space: Space,
        owner: &str,
        decide: &mut dyn FnMut(Option<&str>) -> Write,
    ) -> Result<bool, StoreError> {
        (**self).update(space, owner, decide)
    }
    fn insert(&self, space: Space, owner: &str, value: &str) -> Result<bool, StoreError> {
        (**self).insert(space, owner, value)
    }
    fn keeps(&self, space: Space) -> bool {
        (**self).keeps(space)
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

/// Slots of a `MemoryBackend`, shared by the backends made with `sharing`.
pub type Slots = Rc<RefCell<BTreeMap<(Space, String), String>>>;

/// In-memory backend for tests and benchmarks, with optional fault injection. Its `update`
/// is a compare-and-set, like the one on SQL: two backends made to share one map (see
/// `sharing`) behave as two processes on one database, and `between_read_and_write` lets
/// a test run the other one's operation at the worst moment.
#[derive(Default)]
pub struct MemoryBackend {
    pub slots: Slots,
    pub logs: RefCell<Vec<(Level, String)>>,
    /// Fail one operation after this many more succeed (`None`: never), then work again.
    pub fail_after: Cell<Option<usize>>,
    /// Once `fail_after` has failed an operation, fail every later one too (a store gone).
    pub stay_failed: Cell<bool>,
    pub ops: Cell<usize>,
    /// How many times an invite was read.
    pub invite_reads: Cell<usize>,
    /// Accounts that exist, as far as `account_exists` is concerned.
    pub accounts: Rc<RefCell<std::collections::BTreeSet<String>>>,
    /// Run once by the next `update`, after it read and decided and before it writes.
    #[allow(clippy::type_complexity)]
    pub between_read_and_write: RefCell<Option<Box<dyn FnOnce()>>>,
    /// How many times an `update` found the slot changed since its read.
    pub conflicts: Cell<usize>,
}

impl MemoryBackend {
    pub fn new() -> MemoryBackend {
        MemoryBackend::default()
    }

    /// Another backend over the same slots and accounts: another process on one database.
    pub fn sharing(&self) -> MemoryBackend {
        MemoryBackend {
            slots: Rc::clone(&self.slots),
            accounts: Rc::clone(&self.accounts),
            ..MemoryBackend::default()
        }
    }

    /// Runs `f` in the next `update`, between its read and its write.
    pub fn interleave(&self, f: impl FnOnce() + 'static) {
        *self.between_read_and_write.borrow_mut() = Some(Box::new(f));
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
        if space == Space::Invites {
            self.invite_reads.set(self.invite_reads.get() + 1);
        }
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

    /// Compare-and-set: the write happens only if the slot still holds what was read.
    fn update(
        &self,
        space: Space,
        owner: &str,
        decide: &mut dyn FnMut(Option<&str>) -> Write,
    ) -> Result<bool, StoreError> {
        let key = (space, owner.to_owned());
        update_by_swap(self, space, owner, decide, &mut |expected, new| {
            let interleaved = self.between_read_and_write.borrow_mut().take();
            if let Some(other) = interleaved {
                other();
            }
            self.tick()?;
            let mut slots = self.slots.borrow_mut();
            if slots.get(&key).map(String::as_str) != expected {
                self.conflicts.set(self.conflicts.get() + 1);
                return Ok(false);
            }
            match new {
                Some(v) => slots.insert(key.clone(), v.to_owned()),
                None => slots.remove(&key),
            };
            Ok(true)
        })
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
