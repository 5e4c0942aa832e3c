-- storage.lib.lua: how each store of a host is kept atomic between processes, per driver.

local helpers = require "spec.helpers";

-- A util.sql engine that answers every write with `affected` rows and remembers the SQL.
local function fake_engine(driver, affected)
	local engine = { params = { driver = driver, database = "prosody" }, conn = {}, ran = {} };
	function engine.transaction(_, f, ...)
		return pcall(f, ...);
	end
	local function run(self, sql, ...)
		table.insert(self.ran, { sql = sql:gsub("%s+", " "), args = { ... } });
		return { affected = function () return affected; end };
	end
	engine.update, engine.delete, engine.insert = run, run, run;
	function engine:select(sql, ...)
		run(self, sql, ...);
		return function () return nil; end;
	end
	return engine;
end

local function access_with(drivers, engine, locking)
	local storagemanager = {
		get_driver = function (_, store) return nil, drivers[store]; end;
	};
	package.loaded["core.storagemanager"] = storagemanager;
	package.loaded["util.datamanager"] = { getpath = function () return "/data/localhost/invites.lock"; end };
	package.loaded["util.paths"] = { resolve_relative_path = function (_, p) return p; end };
	_G.prosody = { process_type = "prosody", paths = { data = "/data" } };
	package.loaded["lua.mod_invites.storage.lib"] = nil;
	local make = dofile("lua/mod_invites/storage.lib.lua");
	local m = helpers.fake_module("invites", "localhost", { sql = { driver = engine and engine.params.driver,
		database = "prosody" } });
	m.shared = function () return { engine }; end;
	local names = { invites = "invites", names = "invites_by_username", accounts = "invite_accounts" };
	local opened = { invites = {}, names = {}, accounts = {} };
	return make(m, opened, names, locking);
end

describe("storage access", function ()
	it("should compare-and-set on PostgreSQL and SQLite, lock internal storage, and say what it cannot lock", function ()
		local engine = fake_engine("PostgreSQL", 1);
		local access = access_with({ invites = "sql", invites_by_username = "internal", invite_accounts = "memory" },
			engine);
		assert.same({ invites = "swap", names = "lock" }, access.atomic);
		assert.equal("/data/localhost/invites.lock", access.lock_file);
		assert.equal('storage driver "memory"', access.warning);

		access = access_with({ invites = "sql", invites_by_username = "sql", invite_accounts = "sql" },
			fake_engine("MySQL", 1));
		assert.same({}, access.atomic);
		assert.equal('storage "sql" with driver MySQL', access.warning);

		access = access_with({ invites = "internal", invites_by_username = "internal", invite_accounts = "internal" },
			nil, false);
		assert.same({}, access.atomic);
		assert.equal("invites_storage_lock = false", access.warning);
	end);

	it("should write only if the row still holds what was read", function ()
		local engine = fake_engine("SQLite3", 1);
		local access = access_with({ invites = "sql", invites_by_username = "sql", invite_accounts = "sql" }, engine);
		assert.is_true(access.swap("invites", "k1", "old", "new"));
		local update = engine.ran[#engine.ran];
		assert.matches('^ ?UPDATE "prosody" SET "value"=%? WHERE .* AND "value"=%?$', update.sql);
		assert.same({ "new", "localhost", "k1", "invites", "old" }, update.args);
		assert.is_true(access.swap("names", "alice", "old", nil));
		assert.matches('^ ?DELETE FROM "prosody" WHERE .* AND "value"=%?$', engine.ran[#engine.ran].sql);
		assert.equal("invites_by_username", engine.ran[#engine.ran].args[3]);
		assert.is_true(access.swap("accounts", "account:bob", nil, "entry"));
		assert.matches('INSERT INTO "prosody" .* WHERE NOT EXISTS', engine.ran[#engine.ran].sql);

		-- Another process changed the row first: nothing matches, the core reads again.
		local lost = fake_engine("SQLite3", 0);
		access = access_with({ invites = "sql", invites_by_username = "sql", invite_accounts = "sql" }, lost);
		assert.is_false(access.swap("invites", "k1", "old", "new"));
	end);
end);
