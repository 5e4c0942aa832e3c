//! The Lua boundary: every export and book method, called through a real Lua 5.4 state with
//! Lua values chosen by the input (nil, booleans, extreme integers, NaN and infinities,
//! strings that are not UTF-8, nested and deeply nested tables, functions that raise,
//! coroutines, the wrong userdata), over stores whose `get`/`set` follow a plan of faults
//! (errors, raised errors, values of the wrong shape, stored records patched in place,
//! calls back into the book).
//!
//! A call must return or raise a Lua error: a panic anywhere, even one `catch_unwind`
//! would turn into `internal-server-error`, aborts the process (libfuzzer-sys's panic hook)
//! and is a finding. Besides: an expected failure is `nil` and a known error name, a method
//! returns at least one value, no log line and no raised error contains a token, and with
//! stores that behave, an invite `create` returns can be listed at once.
//!
//! `FUZZ_TRACE=1 cargo fuzz run lua_values FILE` shows what an input calls and gets.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mlua::{AnyUserData, Function, Lua, LuaOptions, MultiValue, ObjectLike, StdLib, Table, Value};
use prosody_invites::error::InviteError;
use prosody_invites::lua::exports;
use prosody_invites::token::Token;

/// Lua side of the harness: value builders and a Prosody-like keyval store with faults.
const HELPERS: &str = r#"
local helpers = { lines = {} };

function helpers.log(level, message)
	helpers.lines[#helpers.lines + 1] = tostring(level) .. " " .. tostring(message);
end

function helpers.const(...)
	local values = table.pack(...);
	return function () return table.unpack(values, 1, values.n); end
end

function helpers.raiser(e)
	return function () error(e, 0); end
end

-- Calls a book method from inside a store call (the book is set once it exists).
function helpers.reenter(method, ...)
	local args = table.pack(...);
	return function ()
		local book = helpers.book;
		if book == nil then return nil; end
		return book[method](book, table.unpack(args, 1, args.n));
	end
end

function helpers.nest(depth, leaf, as_map)
	local t = leaf;
	for _ = 1, depth do
		if as_map then t = { x = t }; else t = { t }; end
	end
	return t;
end

-- One plan entry per call; calls past the end of the plan behave.
function helpers.store(plan)
	local data, step = {}, 0;
	local function fault()
		step = step + 1;
		return plan[step] or { op = "ok" };
	end
	local store = {};
	function store.get(self, owner)
		local f = fault();
		if f.op == "fail" then return nil, f.value;
		elseif f.op == "raise" then error(f.value, 0);
		elseif f.op == "value" then return f.value;
		elseif f.op == "record" then return { record = f.value };
		elseif f.op == "call" then return f.value(self, owner);
		elseif f.op == "patch" then
			local v = data[owner];
			if type(v) == "table" and type(v.record) == "string" then
				return { record = (v.record:gsub(f.pattern, function () return f.value; end)) };
			end
			return v;
		end
		return data[owner];
	end
	function store.set(self, owner, value)
		local f = fault();
		if f.op == "fail" then return nil, f.value;
		elseif f.op == "false" then return false, f.value;
		elseif f.op == "raise" then error(f.value, 0);
		elseif f.op == "value" then return f.value;
		elseif f.op == "call" then return f.value(self, owner, value);
		end
		data[owner] = value;
		return true;
	end
	return store;
end

return helpers;
"#;

const T0: i64 = 1_700_000_000;

const INTEGERS: &[i64] = &[
    0,
    1,
    -1,
    2,
    60,
    3600,
    i64::MIN,
    i64::MAX,
    i64::MIN + 1,
    i64::MAX - 1,
    u32::MAX as i64,
    u32::MAX as i64 + 1,
    1 << 53,
    (1 << 53) + 1,
    T0,
];

const FLOATS: &[f64] = &[
    f64::NAN,
    f64::INFINITY,
    f64::NEG_INFINITY,
    -0.0,
    0.5,
    1.5,
    -1.5,
    1.0,
    8_999_999_999_999_999.0,
    9.0e15,
    9_223_372_036_854_775_808.0,
    -9_223_372_036_854_775_808.0,
    1.0e300,
    f64::MIN_POSITIVE,
    f64::EPSILON,
    T0 as f64,
];

/// Hosts a caller may act for: the book's, in another case, and another host's.
const HOSTS: &[&str] = &["example.com", "Example.COM", "b.example.com"];

const WORDS: &[&str] = &[
    "",
    "register",
    "roster",
    "example.com",
    "alice@example.com",
    "alice",
    "bob",
    "h1",
    "fuzz",
    "30m",
    "1 week",
    "10.0.0.1",
    "sha256:",
    "prosody:admin",
    "record",
    "\u{e9}",
    "a\0b",
];

/// Table keys the exports read, so random tables sometimes have the right shape.
const FIELDS: &[&str] = &[
    "type",
    "jid",
    "allow_registration",
    "additional_data",
    "ttl",
    "reusable",
    "max_uses",
    "username",
    "reset",
    "inviter",
    "holder",
    "account_exists",
    "validated_at",
    "lease_until",
    "created_at",
    "expires",
    "record",
    "get",
    "set",
    "invites",
    "names",
    "log",
    "roles",
    "allow_reset",
];

const NEST_DEPTHS: &[i64] = &[2, 16, 32, 33, 126, 127, 128, 1_000, 20_000];

/// Fields of a stored record a `patch` fault rewrites, and what it writes there.
const PATCH_FIELDS: &[&str] = &[
    "v",
    "hash",
    "type",
    "jid",
    "allow_registration",
    "additional_data",
    "created_at",
    "expires",
    "reusable",
    "max_uses",
    "uses",
    "state",
    "changed_at",
    "reservations",
    "username",
    "reset",
    "inviter",
    "until",
    "holder",
];

const JSON_FRAGMENTS: &[&str] = &[
    "0",
    "1",
    "-1",
    "2",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "-9223372036854775808",
    "9223372036854775808",
    "18446744073709551615",
    "1e400",
    "1.5",
    "-0",
    "null",
    "true",
    "false",
    "\"x\"",
    "\"\"",
    "[]",
    "{}",
    "\"pending\"",
    "\"used\"",
    "\"revoked\"",
    "\"roster\"",
    "\"sha256:0000000000000000000000000000000000000000000000000000000000000000\"",
    "[{\"holder\":\"h\",\"until\":9223372036854775807,\"username\":\"alice\"}]",
    "[{\"holder\":\"h\",\"until\":-9223372036854775808}]",
    "[{\"holder\":\"h1\",\"until\":1700000000,\"username\":\"alice\"},{\"holder\":\"h1\",\"until\":1}]",
    "{\"allow_reset\":\"alice\",\"roles\":{\"prosody:admin\":true}}",
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
];

const BOOK_METHODS: &[&str] = &[
    "create",
    "get",
    "reserve",
    "confirm",
    "release",
    "use",
    "revoke",
    "revoke_key",
    "prune",
    "username_reserved",
    "listed",
    "import_legacy",
    "resolve",
];

/// Builds the value an argument or field should have.
type Good<H> = fn(&mut H) -> mlua::Result<Value>;

/// The input, read front to back; past its end every read is zero.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    fn below(&mut self, n: usize) -> usize {
        usize::from(self.byte()) % n
    }

    fn flip(&mut self) -> bool {
        self.byte() & 1 == 1
    }

    fn pick<T: Copy>(&mut self, options: &[T]) -> T {
        options[self.below(options.len())]
    }

    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (taken, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        taken
    }

    fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        let taken = self.bytes(8);
        b[..taken.len()].copy_from_slice(taken);
        u64::from_le_bytes(b)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

struct Harness<'a> {
    lua: Lua,
    core: Table,
    helpers: Table,
    input: Input<'a>,
    book: Option<AnyUserData>,
    /// Tokens `create` handed out, and their storage keys.
    tokens: Vec<String>,
    keys: Vec<String>,
    /// Stores that follow no fault plan, so what is written can be read back.
    clean: bool,
    /// Set while building what a store or callback may echo into an error or a log line
    /// (which must then hold no token of ours).
    secretless: bool,
}

fuzz_target!(|data: &[u8]| {
    // The libraries the helpers use; the core needs none.
    let lua =
        Lua::new_with(StdLib::TABLE | StdLib::STRING, LuaOptions::default()).expect("a Lua state");
    lua.set_memory_limit(256 << 20).expect("a memory limit");
    let core = exports(&lua).expect("the exports table");
    let helpers: Table = lua.load(HELPERS).eval().expect("the harness helpers");
    let mut h = Harness {
        lua,
        core,
        helpers,
        input: Input(data),
        book: None,
        tokens: Vec::new(),
        keys: Vec::new(),
        clean: false,
        secretless: false,
    };
    h.run().expect("the harness's own Lua calls");
});

impl Harness<'_> {
    fn run(&mut self) -> mlua::Result<()> {
        self.new_book()?;
        let mut steps = 0;
        while !self.input.is_empty() && steps < 64 {
            steps += 1;
            match self.input.below(8) {
                0 => self.call_export()?,
                1 => self.new_book()?,
                _ => self.call_method()?,
            }
        }
        let lines: Vec<String> = self
            .helpers
            .get::<Table>("lines")?
            .sequence_values()
            .collect::<mlua::Result<_>>()?;
        for line in &lines {
            self.assert_no_token(line, "a log line");
        }
        Ok(())
    }

    fn assert_no_token(&self, text: &str, what: &str) {
        for token in &self.tokens {
            assert!(
                !text.contains(token.as_str()),
                "{what} contains a token: {text:?}"
            );
        }
    }

    // -----------------------------------------------------------------------------------
    // Values

    fn string(&self, s: impl AsRef<[u8]>) -> mlua::Result<Value> {
        self.lua.create_string(s).map(Value::String)
    }

    fn value(&mut self, depth: u32) -> mlua::Result<Value> {
        Ok(match self.input.below(16) {
            0 => Value::Nil,
            1 => Value::Boolean(self.input.flip()),
            2 => Value::Integer(self.input.pick(INTEGERS)),
            3 => Value::Integer(self.input.u64() as i64),
            4 => Value::Number(self.input.pick(FLOATS)),
            5 => Value::Number(f64::from_bits(self.input.u64())),
            6 => {
                let word = self.input.pick(WORDS);
                self.string(word)?
            }
            7 => {
                let n = self.input.below(48);
                let bytes = self.input.bytes(n);
                self.string(bytes)?
            }
            8 => self.token()?,
            9 => self.key()?,
            10 if depth < 4 => {
                let t = self.lua.create_table()?;
                for _ in 0..self.input.below(6) {
                    let k = match self.input.below(3) {
                        0 => {
                            let field = self.input.pick(FIELDS);
                            self.string(field)?
                        }
                        1 => Value::Integer(self.input.below(4) as i64 + 1),
                        _ => self.value(depth + 1)?,
                    };
                    let v = self.value(depth + 1)?;
                    // nil and NaN keys are refused; that is the harness's problem, not a finding.
                    let _ = t.raw_set(k, v);
                }
                Value::Table(t)
            }
            11 => Value::Function(self.function(depth)?),
            12 => {
                let depth = self.input.pick(NEST_DEPTHS);
                let leaf = self.value(4)?;
                let as_map = self.input.flip();
                let nest: Function = self.helpers.get("nest")?;
                nest.call((depth, leaf, as_map))?
            }
            13 => match (&self.book, self.input.flip()) {
                (Some(book), true) => Value::UserData(book.clone()),
                _ => {
                    let throttle: Function = self.core.get("throttle")?;
                    throttle.call((1, 1, 1))?
                }
            },
            14 => {
                let f = self.function(depth)?;
                Value::Thread(self.lua.create_thread(f)?)
            }
            _ => Value::Integer(self.time_good()),
        })
    }

    fn function(&mut self, depth: u32) -> mlua::Result<Function> {
        let outer = std::mem::replace(&mut self.secretless, true);
        let f = self.function_body(depth);
        self.secretless = outer;
        f
    }

    fn function_body(&mut self, depth: u32) -> mlua::Result<Function> {
        let depth = depth.max(3);
        match self.input.below(4) {
            0 => {
                let const_: Function = self.helpers.get("const")?;
                let a = self.value(depth + 1)?;
                let b = self.value(depth + 1)?;
                const_.call((a, b))
            }
            1 => {
                let raiser: Function = self.helpers.get("raiser")?;
                let e = self.value(depth + 1)?;
                raiser.call(e)
            }
            2 => {
                let reenter: Function = self.helpers.get("reenter")?;
                let method = self.input.pick(BOOK_METHODS);
                let a = self.value(depth + 1)?;
                let b = self.value(depth + 1)?;
                reenter.call((method, a, b))
            }
            _ => self
                .lua
                .create_function(|_, _: MultiValue| -> mlua::Result<()> {
                    Err(mlua::Error::runtime("raised by a Rust function"))
                }),
        }
    }

    fn token(&mut self) -> mlua::Result<Value> {
        if !self.secretless && !self.tokens.is_empty() && self.input.below(4) != 0 {
            let i = self.input.below(self.tokens.len());
            return self.string(self.tokens[i].clone());
        }
        let text = self
            .input
            .pick(&["fuzz", "Ab-_09xyzXYZ12-_", "", "not a token", "x"]);
        self.string(text)
    }

    fn key(&mut self) -> mlua::Result<Value> {
        if !self.keys.is_empty() && self.input.below(4) != 0 {
            let i = self.input.below(self.keys.len());
            return self.string(self.keys[i].clone());
        }
        let fuzz = Token::parse("fuzz").expect("a token").hash().key();
        let key = match self.input.below(3) {
            0 => fuzz,
            1 => fuzz.to_uppercase(),
            _ => String::from("zz"),
        };
        self.string(key)
    }

    fn time_good(&mut self) -> i64 {
        let offsets = [
            0,
            1,
            59,
            60,
            61,
            3599,
            3600,
            3601,
            86_400,
            30 * 86_400,
            -1,
            -3600,
        ];
        T0 + self.input.pick(&offsets)
    }

    fn time(&mut self) -> mlua::Result<Value> {
        match self.input.below(8) {
            0 => self.value(2),
            1 => Ok(Value::Integer(self.input.pick(INTEGERS))),
            2 => Ok(Value::Number(self.time_good() as f64)),
            _ => Ok(Value::Integer(self.time_good())),
        }
    }

    /// Mostly what the argument should be, sometimes anything at all.
    fn arg(&mut self, good: impl FnOnce(&mut Self) -> mlua::Result<Value>) -> mlua::Result<Value> {
        if self.input.below(8) == 0 {
            self.value(1)
        } else {
            good(self)
        }
    }

    fn word(&mut self, options: &[&str]) -> mlua::Result<Value> {
        let w = self.input.pick(options);
        self.string(w)
    }

    fn opt_word(&mut self, options: &[&str]) -> mlua::Result<Value> {
        if self.input.flip() {
            self.word(options)
        } else {
            Ok(Value::Nil)
        }
    }

    /// A table with `fields`, each either its good value, absent, or anything at all.
    fn spec(&mut self, fields: &[(&str, Good<Self>)]) -> mlua::Result<Value> {
        let t = self.lua.create_table()?;
        for (name, good) in fields {
            let v = match self.input.below(8) {
                0 => Value::Nil,
                1 => self.value(1)?,
                _ => good(self)?,
            };
            t.raw_set(*name, v)?;
        }
        Ok(Value::Table(t))
    }

    fn additional_data(&mut self) -> mlua::Result<Value> {
        match self.input.below(4) {
            0 => Ok(Value::Nil),
            1 => {
                let roles = self.lua.create_table()?;
                roles.raw_set("prosody:admin", true)?;
                let t = self.lua.create_table()?;
                t.raw_set("roles", roles)?;
                if self.input.flip() {
                    t.raw_set("allow_reset", "alice")?;
                }
                Ok(Value::Table(t))
            }
            _ => self.value(0),
        }
    }

    fn create_spec(&mut self) -> mlua::Result<Value> {
        self.spec(&[
            ("type", |h| h.word(&["register", "roster"])),
            ("jid", |h| h.word(&["example.com", "alice@example.com"])),
            ("allow_registration", |h| {
                Ok(Value::Boolean(h.input.below(4) != 0))
            }),
            ("additional_data", |h| h.additional_data()),
            ("ttl", |h| {
                Ok(Value::Integer(h.input.pick(&[0, 1, 60, 3600, 86_400])))
            }),
            ("reusable", |h| Ok(Value::Boolean(h.input.flip()))),
            ("max_uses", |h| {
                Ok(match h.input.below(4) {
                    0 => Value::Nil,
                    _ => Value::Integer(h.input.pick(&[1, 2, 3, u32::MAX as i64])),
                })
            }),
            ("username", |h| h.opt_word(&["alice", "bob"])),
            ("reset", |h| h.opt_word(&["alice", "bob"])),
            ("inviter", |h| h.opt_word(&["alice", "bob"])),
        ])
    }

    fn claim(&mut self) -> mlua::Result<Value> {
        self.spec(&[
            ("holder", |h| h.word(&["h1", "h2", "h3"])),
            ("username", |h| h.word(&["alice", "bob", "carol"])),
            ("account_exists", |h| {
                Ok(Value::Boolean(h.input.below(4) == 0))
            }),
            ("validated_at", |h| Ok(Value::Integer(h.time_good()))),
            ("lease_until", |h| Ok(Value::Integer(h.time_good()))),
        ])
    }

    fn legacy(&mut self) -> mlua::Result<Value> {
        self.spec(&[
            ("type", |h| h.word(&["register", "roster"])),
            ("jid", |h| h.word(&["example.com", "alice@example.com"])),
            ("allow_registration", |h| Ok(Value::Boolean(h.input.flip()))),
            ("additional_data", |h| h.additional_data()),
            ("created_at", |h| Ok(Value::Integer(h.time_good()))),
            ("expires", |h| Ok(Value::Integer(h.time_good()))),
            ("reusable", |h| Ok(Value::Boolean(h.input.flip()))),
        ])
    }

    // -----------------------------------------------------------------------------------
    // Stores and books

    /// A fault plan for one store: what each of its next calls does.
    fn plan(&mut self) -> mlua::Result<Table> {
        let outer = std::mem::replace(&mut self.secretless, true);
        let plan = self.plan_body();
        self.secretless = outer;
        plan
    }

    fn plan_body(&mut self) -> mlua::Result<Table> {
        let plan = self.lua.create_table()?;
        for i in 1..=self.input.below(12) {
            let f = self.lua.create_table()?;
            let op = self.input.pick(&[
                "ok", "fail", "false", "raise", "value", "record", "call", "patch",
            ]);
            f.raw_set("op", op)?;
            match op {
                "call" => f.raw_set("value", self.function(1)?)?,
                "record" if self.input.flip() => {
                    let n = self.input.below(200);
                    let bytes = self.input.bytes(n);
                    f.raw_set("value", self.string(bytes)?)?
                }
                "patch" => {
                    let field = self.input.pick(PATCH_FIELDS);
                    f.raw_set("pattern", format!("\"{field}\":[^,}}]*"))?;
                    let fragment = self.input.pick(JSON_FRAGMENTS);
                    f.raw_set("value", format!("\"{field}\":{fragment}"))?;
                }
                _ => f.raw_set("value", self.value(1)?)?,
            }
            plan.raw_set(i, f)?;
        }
        Ok(plan)
    }

    fn store(&mut self, clean: bool) -> mlua::Result<Value> {
        if self.input.below(16) == 0 {
            return self.value(1);
        }
        let plan = if clean {
            self.lua.create_table()?
        } else {
            self.plan()?
        };
        let store: Function = self.helpers.get("store")?;
        store.call(plan)
    }

    fn new_book(&mut self) -> mlua::Result<()> {
        let clean = self.input.below(4) == 0;
        let config = self.lua.create_table()?;
        let host = match self.input.below(16) {
            0 => self.value(1)?,
            _ => self.word(&["example.com", "EXAMPLE.com"])?,
        };
        config.raw_set("host", host)?;
        let invites = self.store(clean)?;
        config.raw_set("invites", invites)?;
        let names = self.store(clean)?;
        config.raw_set("names", names)?;
        let log = match self.input.below(8) {
            0 => self.value(1)?,
            _ => self.helpers.get("log")?,
        };
        config.raw_set("log", log)?;
        let account_exists = match self.input.below(4) {
            0 => Value::Nil,
            1 => Value::Function(self.function(1)?),
            _ => {
                let const_: Function = self.helpers.get("const")?;
                Value::Function(const_.call(self.input.flip())?)
            }
        };
        config.raw_set("account_exists", account_exists)?;
        let config = match self.input.below(16) {
            0 => self.value(1)?,
            _ => Value::Table(config),
        };
        let new: Function = self.core.get("new")?;
        if let Some(values) = self.checked("new", new.call::<MultiValue>(config), &[]) {
            if let Some(Value::UserData(book)) = values.front() {
                self.helpers.raw_set("book", book.clone())?;
                self.book = Some(book.clone());
                self.clean = clean;
            }
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------
    // Calls

    /// Checks one call's outcome; returns its values if it returned.
    fn checked(
        &self,
        what: &str,
        result: mlua::Result<MultiValue>,
        error_names: &[&str],
    ) -> Option<MultiValue> {
        if tracing() {
            eprintln!("{what} -> {result:?}");
        }
        match result {
            Err(e) => {
                self.assert_no_token(&e.to_string(), "a raised error");
                None
            }
            Ok(values) => {
                assert!(!values.is_empty(), "{what} returned nothing");
                if let (Some(Value::Nil), Some(second)) = (values.front(), values.get(1)) {
                    if !error_names.is_empty() {
                        let name = second
                            .as_string()
                            .map(|s| s.to_string_lossy())
                            .unwrap_or_default();
                        assert!(
                            error_names.contains(&name.as_str()),
                            "{what} failed with {second:?}, not an error name"
                        );
                    }
                }
                Some(values)
            }
        }
    }

    fn call_export(&mut self) -> mlua::Result<()> {
        match self.input.below(3) {
            0 => {
                let f: Function = self.core.get("parse_duration")?;
                let v = self.arg(|h| {
                    let w = h.input.pick(&["30m", "1 week", "12h", "0", "11y", " 3d "]);
                    h.string(w)
                })?;
                self.checked("parse_duration", f.call(v), &[]);
            }
            1 => {
                let f: Function = self.core.get("key_of")?;
                let v = self.arg(|h| h.token())?;
                let names = ["no-token", "token-invalid"];
                self.checked("key_of", f.call(v), &names);
            }
            _ => {
                let f: Function = self.core.get("throttle")?;
                let max = self.arg(|h| Ok(Value::Integer(h.input.pick(&[1, 3, i64::MAX]))))?;
                let period = self.arg(|h| Ok(Value::Integer(h.input.pick(&[1, 60, i64::MAX]))))?;
                let cap =
                    self.arg(|h| Ok(Value::Integer(h.input.pick(&[1, 8, 1024, i64::MAX]))))?;
                let Some(values) = self.checked("throttle", f.call((max, period, cap)), &[]) else {
                    return Ok(());
                };
                let Some(Value::UserData(throttle)) = values.front() else {
                    return Ok(());
                };
                for _ in 0..self.input.below(16) {
                    let method = self.input.pick(&["allows", "failed", "tracked"]);
                    let f: Function = throttle.get(method)?;
                    let address = self.arg(|h| h.word(&["10.0.0.1", "10.0.0.2", "::1"]))?;
                    let now = self.time()?;
                    self.checked(method, f.call((throttle.clone(), address, now)), &[]);
                }
            }
        }
        Ok(())
    }

    fn call_method(&mut self) -> mlua::Result<()> {
        let Some(book) = self.book.clone() else {
            return Ok(());
        };
        let method = self.input.pick(BOOK_METHODS);
        let mut args = vec![match self.input.below(16) {
            0 => self.value(1)?,
            _ => Value::UserData(book.clone()),
        }];
        match method {
            "create" => {
                args.push(self.arg(|h| h.create_spec())?);
                args.push(self.time()?);
            }
            "get" | "use" => {
                args.push(self.arg(|h| h.token())?);
                args.push(self.arg(|h| h.opt_word(&["alice", "bob"]))?);
                args.push(self.arg(|h| h.word(HOSTS))?);
                args.push(self.time()?);
            }
            "reserve" => {
                args.push(self.arg(|h| h.token())?);
                args.push(self.arg(|h| h.claim())?);
                args.push(self.arg(|h| h.word(HOSTS))?);
                args.push(self.time()?);
            }
            "confirm" => {
                args.push(self.arg(|h| h.token())?);
                args.push(self.arg(|h| h.word(&["h1", "h2", "h3"]))?);
                args.push(self.arg(|h| h.word(HOSTS))?);
                args.push(self.time()?);
            }
            "release" => {
                args.push(self.arg(|h| h.token())?);
                args.push(self.arg(|h| h.word(&["h1", "h2", "h3"]))?);
                args.push(self.time()?);
            }
            "resolve" => {
                // A token, a key, or an id (a key's end).
                args.push(self.arg(|h| match h.input.below(3) {
                    0 => h.token(),
                    1 => h.key(),
                    _ => h.word(&["0000", "abcd", "zz", "f"]),
                })?);
            }
            "revoke" => {
                args.push(self.arg(|h| h.token())?);
                args.push(self.time()?);
            }
            "revoke_key" | "listed" => {
                args.push(self.arg(|h| h.key())?);
                args.push(self.time()?);
            }
            "prune" => {
                args.push(self.arg(|h| h.key())?);
                args.push(self.time()?);
                args.push(self.arg(|h| {
                    Ok(Value::Integer(h.input.pick(&[
                        0,
                        60,
                        -1,
                        i64::MIN,
                        i64::MAX,
                    ])))
                })?);
            }
            "username_reserved" => {
                args.push(self.arg(|h| h.word(&["alice", "bob", "carol"]))?);
                args.push(self.time()?);
            }
            _ => {
                args.push(self.arg(|h| h.token())?);
                args.push(self.arg(|h| h.legacy())?);
                args.push(self.arg(|h| h.opt_word(&["alice", "bob"]))?);
                args.push(self.time()?);
            }
        }
        match self.input.below(16) {
            0 => {
                args.pop();
            }
            1 => args.push(self.value(1)?),
            _ => {}
        }
        let now = args.last().cloned();
        let f: Function = book.get(method)?;
        let names = error_names();
        let result = f.call::<MultiValue>(MultiValue::from_vec(args));
        let Some(values) = self.checked(method, result, &names) else {
            return Ok(());
        };
        if method == "create" {
            self.remember_created(&values, now)?;
        }
        Ok(())
    }

    /// Keeps the token of a created invite for later calls; with stores that behave, the
    /// invite must be readable at once.
    fn remember_created(&mut self, values: &MultiValue, now: Option<Value>) -> mlua::Result<()> {
        let Some(Value::Table(invite)) = values.front() else {
            return Ok(());
        };
        let Some(token) = invite
            .raw_get::<Value>("token")?
            .as_string()
            .map(|s| s.to_string_lossy())
        else {
            return Ok(());
        };
        let key = Token::parse(&token)
            .expect("create hands out tokens that parse")
            .hash()
            .key();
        self.tokens.push(token);
        self.keys.push(key.clone());
        if self.clean {
            if let Some(book) = &self.book {
                let listed: Function = book.get("listed")?;
                let created_at = invite.raw_get::<Value>("created_at")?;
                let found = listed.call::<Value>((book.clone(), key, created_at));
                assert!(
                    matches!(found, Ok(Value::Table(_))),
                    "a created invite is not listed: {found:?} (now {now:?})"
                );
            }
        }
        Ok(())
    }
}

/// `FUZZ_TRACE=1` prints every call and its outcome, to read what an input does.
fn tracing() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("FUZZ_TRACE").is_some())
}

fn error_names() -> Vec<&'static str> {
    InviteError::ALL.iter().map(InviteError::name).collect()
}
