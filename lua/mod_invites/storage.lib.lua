-- How the invites of one host stay right when several processes share their storage (two
-- Prosody servers on one database, or a server and prosodyctl), and how listings read it.
--
-- The core makes every change to an invite one read-check-write (src/store.rs, `update`);
-- this says how the storage keeps others out between the read and the write:
--
-- * sql (PostgreSQL, SQLite): a compare-and-set in the database. The write is a conditional
--   UPDATE (DELETE, INSERT) on Prosody's own "prosody" table, on the row that
--   mod_storage_sql reads and writes for the record ("key" = 'record'), that takes only if
--   the row still holds what was read; otherwise the core reads again. It goes through the
--   host's own util.sql engine (mod_storage_sql's connection), so the data stays exactly
--   what module:open_store() reads. SQLite waits for a lock instead of failing at once
--   ("database is locked"): a busy timeout on that connection.
-- * internal: an advisory lock (flock) on "invites.lock" in the host's data directory,
--   held around each change. The kernel releases it when its process ends, however it ends.
-- * anything else (another storage module, or MySQL, whose text comparison ignores case):
--   atomic within one process only, said once at start.
--
-- Listings on SQL read pages of keys (keyset: ORDER BY "user", after the last one seen), so
-- at most one page is held however many invites there are; Prosody's own store:users()
-- reads every key before giving the first.

local storagemanager = require "core.storagemanager";
local datamanager = require "util.datamanager";
local resolve_relative_path = require "util.paths".resolve_relative_path;

local page_size = 500;
-- In the server: long enough for another process's write to finish, short enough that a
-- database locked for good (a backup holding it) fails a request rather than holding up the
-- server (the wait blocks it: LuaDBI cannot wait in the background). A prosodyctl command
-- holds up nobody: it waits longer for servers busy writing.
local busy_timeout_ms = prosody.process_type == "prosody" and 1000 or 10000;

local update_sql = [[
UPDATE "prosody" SET "value"=?
WHERE "host"=? AND "user"=? AND "store"=? AND "key"='record' AND "type"='string' AND "value"=?]];
local delete_sql = [[
DELETE FROM "prosody"
WHERE "host"=? AND "user"=? AND "store"=? AND "key"='record' AND "type"='string' AND "value"=?]];
local insert_sql = [[
INSERT INTO "prosody" ("host","user","store","key","type","value")
SELECT CAST(? AS TEXT), CAST(? AS TEXT), CAST(? AS TEXT), 'record', 'string', CAST(? AS TEXT)
WHERE NOT EXISTS (SELECT 1 FROM "prosody" WHERE "host"=? AND "user"=? AND "store"=?)]];
local exists_sql = [[
SELECT 1 FROM "prosody" WHERE "host"=? AND "user"=? AND "store"=?]];
local page_sql = [[
SELECT DISTINCT "user" FROM "prosody" WHERE "host"=? AND "store"=? AND "user">?
ORDER BY "user" LIMIT ]] .. page_size;

-- Ends the open transaction of a connection, if any: LuaDBI's (util.sql) or LuaSQLite3's
-- (util.sqlite3, which Prosody 13 prefers for SQLite when it is installed).
local function roll_back(conn)
	if conn.rollback then
		conn:rollback();
	else
		conn:exec("ROLLBACK");
	end
end

-- The engine mod_storage_sql made for the host's `sql` option (it keeps one per database
-- in this shared table, under a URI of its params).
local function host_engine(module)
	local params = module:get_option("sql", { driver = "SQLite3", database = "prosody.sqlite" });
	if type(params) ~= "table" or not params.driver then return nil; end
	local database = params.database;
	if params.driver == "SQLite3" and database ~= ":memory:" then
		database = resolve_relative_path(prosody.paths.data or ".", database or "prosody.sqlite");
	end
	for _, engine in pairs(module:shared("/*/sql/connections")) do
		local p = type(engine) == "table" and engine.params;
		if p and p.driver == params.driver and p.database == database and p.host == params.host
				and p.port == params.port and p.username == params.username then
			return engine;
		end
	end
end

-- `swap` and the paged listing over `engine`, for the stores named in `stores`
-- ({ invites = "invites", names = ..., accounts = ... }, by the core's names for them).
local function sql_access(module, engine, stores)
	local host = module.host;
	local tuned; -- the connection the busy timeout was set on
	local function tune(e)
		e = e or engine;
		if e.params.driver == "SQLite3" and e.conn and e.conn ~= tuned then
			-- select(): read to the end and closed, so the statement holds no read lock.
			for _ in e:select(("PRAGMA busy_timeout = %d"):format(busy_timeout_ms)) do end
			tuned = e.conn;
		end
	end
	-- COMPAT: util.sql (0.12, 13) and util.sqlite3 (13) have no hook for either; their
	-- methods are wrapped on this engine, once, for every store that shares it.
	if engine.params.driver == "SQLite3" and not engine.invites_busy_timeout then
		engine.invites_busy_timeout = busy_timeout_ms;
		-- On every (re)connection before anything else runs on it (util.sql reads the
		-- encoding first, then mod_storage_sql creates its table): without it, those would
		-- fail at once on a database another process is writing, and leave the connection
		-- without the timeout.
		local set_encoding = engine.set_encoding;
		engine.set_encoding = function (e, ...)
			pcall(tune, e);
			return set_encoding(e, ...);
		end
		-- util.sql and util.sqlite3 leave a transaction whose COMMIT failed (the other
		-- process held its lock past the timeout) open, holding its locks: nothing on this
		-- connection can commit again (with LuaSQLite3 not even begin) while the other
		-- process waits for those locks too. Roll it back, so that a failed transaction
		-- changed nothing (as it reports) and the next starts clean.
		local run = engine._transaction;
		engine._transaction = function (e, ...)
			local ok, a, b, c = run(e, ...);
			if not ok and e.conn then
				pcall(roll_back, e.conn);
			end
			return ok, a, b, c;
		end
	end

	local function stored(owner, store)
		return engine:select(exists_sql, host, owner, store)() ~= nil;
	end

	-- Replaces what `owner` of the store holds with `new` (nil: removes it) if it still
	-- holds `expected` (nil: nothing). True if it took, false if not, nil, err on failure.
	local function swap(space, owner, expected, new)
		local store = stores[space];
		local ok, took = engine:transaction(function ()
			tune();
			local result;
			if expected and new then
				result = engine:update(update_sql, new, host, owner, store, expected);
			elseif expected then
				result = engine:delete(delete_sql, host, owner, store, expected);
			elseif new then
				result = engine:insert(insert_sql, host, owner, store, new, host, owner, store);
			else
				return not stored(owner, store);
			end
			return result:affected() == 1;
		end);
		if ok then return took; end
		if not expected and new then
			-- Two inserts at once: the database's unique index refused the second.
			local checked, found = engine:transaction(stored, owner, store);
			if checked and found then return false; end
		end
		return nil, took;
	end

	-- Pages of the owners of `store`, in key order: an iterator of lists of at most
	-- `page_size`. Raises on a storage error, as store:users() does.
	local function pages(store)
		local after, done = "", false;
		return function ()
			if done then return nil; end
			local ok, page = engine:transaction(function ()
				tune();
				local owners = {};
				for row in engine:select(page_sql, host, store, after) do
					owners[#owners + 1] = row[1];
				end
				return owners;
			end);
			if not ok then error(page); end
			done = #page < page_size;
			if #page == 0 then return nil; end
			after = page[#page];
			return page;
		end;
	end

	engine:transaction(tune);
	return swap, pages;
end

-- One page of every owner of a store whose listing cannot be paged (collected first: some
-- stores cannot be written while their listing is open).
local function whole_listing(store)
	local done = false;
	return function ()
		if done then return nil; end
		done = true;
		local owners = {};
		for owner in store:users() do
			owners[#owners + 1] = owner;
		end
		return owners;
	end;
end

-- The storage access for the host of `module`, whose stores (opened) are in `opened` and
-- named in `names`, both by the core's names ("invites", "names", "accounts"); each may be
-- routed to its own storage. Returns { atomic = { [space] = "swap" | "lock" | nil },
--   swap = ..., lock_file = ..., warning = what cannot be locked, or nil,
--   pages = function (space) → iterator of pages of owners,
--   store = function (space) → the store, with a users() that pages on SQL }.
return function (module, opened, names, locking)
	local access = { atomic = {} };
	local unlocked = {};
	local swap, sql_pages;
	for space, store_name in pairs(names) do
		local _, driver = storagemanager.get_driver(module.host, store_name);
		local mode;
		if driver == "sql" then
			if not swap then
				local engine = host_engine(module);
				if engine and (engine.params.driver == "PostgreSQL" or engine.params.driver == "SQLite3") then
					swap, sql_pages = sql_access(module, engine, names);
				else
					unlocked[#unlocked + 1] = ("storage \"sql\" with driver %s"):format(
						engine and tostring(engine.params.driver) or "(connection not found)");
				end
			end
			mode = swap and "swap";
		elseif driver == "internal" then
			access.lock_file = access.lock_file
				or datamanager.getpath(nil, module.host, names.invites, "lock", true);
			mode = "lock";
		else
			unlocked[#unlocked + 1] = ("storage driver %q"):format(tostring(driver));
		end
		access.atomic[space] = mode;
	end
	if locking == false then
		access.atomic, unlocked = {}, { "invites_storage_lock = false" };
	end
	access.swap = swap;
	local said, each_once = {}, {};
	for _, what in ipairs(unlocked) do
		if not said[what] then
			said[what] = true;
			each_once[#each_once + 1] = what;
		end
	end
	access.warning = each_once[1] and table.concat(each_once, ", ");

	local function paged(space)
		return sql_pages and access.atomic[space] == "swap";
	end

	function access.pages(space)
		if paged(space) then return sql_pages(names[space]); end
		return whole_listing(opened[space]);
	end

	-- The store the core and listings use: the same, but on SQL its users() reads pages.
	function access.store(space)
		local store = opened[space];
		if not paged(space) or not store then return store; end
		local store_name = names[space];
		return setmetatable({
			users = function ()
				local next_page = sql_pages(store_name);
				local page, i = {}, 0;
				return function ()
					i = i + 1;
					if page[i] == nil then
						page, i = next_page() or {}, 1;
					end
					return page[i];
				end;
			end;
		}, { __index = store });
	end

	return access;
end
