-- Shared helpers for the busted specs: the built core, in-memory Prosody-like stores,
-- and a fake `module` environment that loads our shims the way Prosody does.

local helpers = {};

local repo = debug.getinfo(1, "S").source:match("^@(.*)/spec/helpers%.lua$") or ".";
helpers.repo = repo;
helpers.plugins = os.getenv("INVITES_PLUGINS_DIR") or repo.."/build/plugins";

-- Prosody's own libraries (util.jid, util.stanza, ...) for the shims to require.
package.path = "/usr/lib/prosody/?.lua;"..package.path;
package.cpath = "/usr/lib/prosody/?.so;"..package.cpath;

function helpers.load_core()
	local path = helpers.plugins.."/mod_invites/prosody_invites.so";
	local open = assert(package.loadlib(path, "luaopen_prosody_invites"));
	return open();
end

-- A keyval store with Prosody's interface; `fail` makes set/get return nil, err;
-- `raise` makes them raise.
function helpers.memory_store()
	local store = { data = {} };
	function store:get(owner)
		if self.raise then error(self.raise); end
		if self.fail then return nil, self.fail; end
		return self.data[owner or "@"];
	end
	function store:set(owner, value)
		if self.raise then error(self.raise); end
		if self.fail then return nil, self.fail; end
		self.data[owner or "@"] = value;
		return true;
	end
	function store:users()
		local owner;
		return function ()
			repeat
				owner = next(self.data, owner);
			until owner ~= "@";
			return owner;
		end;
	end
	return store;
end

-- Errors raised by the core are mlua error objects; compare their text.
function helpers.raises(fn, message)
	local ok, err = pcall(fn);
	assert(not ok, "expected an error");
	if message then
		local text = tostring(err);
		assert(text:find(message, 1, true), ("expected error %q, got %q"):format(message, text));
	end
end

function helpers.keys(t)
	local keys = {};
	for k in pairs(t) do table.insert(keys, k); end
	table.sort(keys);
	return keys;
end

function helpers.only_key_for(data, id)
	for k in pairs(data) do
		if k:sub(-#id) == id then return k; end
	end
end

-- Everything in a table, recursively, as text (to search for secrets).
function helpers.dump(v, seen)
	seen = seen or {};
	if type(v) ~= "table" then return tostring(v); end
	if seen[v] then return ""; end
	seen[v] = true;
	local parts = {};
	for k, x in pairs(v) do
		table.insert(parts, helpers.dump(k, seen).."="..helpers.dump(x, seen));
	end
	return "{"..table.concat(parts, ",").."}";
end

-- Stand-ins for the Prosody core modules the shims require; returns the set of usernames
-- that exist, as usermanager.user_exists reports them.
function helpers.fake_prosody_core()
	local existing_users = {};
	package.loaded["core.usermanager"] = {
		user_exists = function (username) return existing_users[username] == true; end;
	};
	package.loaded["core.modulemanager"] = { get_module = function () return nil; end };
	package.loaded["core.rostermanager"] = {};
	helpers.fake_storage_core();
	return existing_users;
end

-- Storage as the shim asks about it: "internal", with its lock file in a temporary file.
function helpers.fake_storage_core(storagemanager)
	storagemanager = storagemanager or {};
	storagemanager.get_driver = function () return nil, "internal"; end;
	package.loaded["core.storagemanager"] = storagemanager;
	local lock_file = os.tmpname();
	package.loaded["util.datamanager"] = { getpath = function () return lock_file; end };
end

-- A fake Prosody `module` for loading a shim outside Prosody.
function helpers.fake_module(name, host, options)
	local stores = {};
	local m = {
		name = name;
		host = host;
		hooks = {};
		events = {};
		logs = {};
		options = options or {};
		stores = stores;
		dependencies = {};
		wrapped = {};
	};
	function m:get_option(opt, default)
		local v = self.options[opt];
		if v == nil then return default; end
		return v;
	end
	function m:get_option_number(opt, default) return self.options[opt] or default; end
	function m:get_option_boolean(opt, default)
		local v = self.options[opt];
		if v == nil then return default; end
		return v;
	end
	function m:get_option_string(opt, default) return self.options[opt] or default; end
	function m:get_option_set(opt, default)
		return require "util.set".new(self.options[opt] or default or {});
	end
	function m:get_option_path(opt, default)
		local v = self.options[opt] or default;
		if v == nil or v:sub(1, 1) == "/" then return v; end
		return (os.getenv("TMPDIR") or "/tmp").."/"..v;
	end
	function m.get_directory() return helpers.plugins.."/mod_"..name; end
	-- module:require(lib): NAME.lib.lua from the module's folder, in its environment.
	function m:require(lib)
		local env = assert(self.environment, "set module.environment before loading the shim");
		return assert(loadfile(helpers.repo.."/lua/mod_"..name.."/"..lib..".lib.lua", "t", env))();
	end
	function m.open_store(_, store_name)
		stores[store_name] = stores[store_name] or helpers.memory_store();
		return stores[store_name];
	end
	function m:log(level, fmt, ...)
		table.insert(self.logs, { level, fmt:format(...) });
	end
	function m:fire_event(event_name, data)
		table.insert(self.events, { event_name, data });
		for _, h in ipairs(self.hooks[event_name] or {}) do
			local ret = h.handler(data);
			if ret ~= nil then return ret; end
		end
	end
	function m:hook(event_name, handler, priority)
		self.hooks[event_name] = self.hooks[event_name] or {};
		table.insert(self.hooks[event_name], { handler = handler, priority = priority or 0 });
		table.sort(self.hooks[event_name], function (a, b) return a.priority > b.priority; end);
	end
	-- Global events (prosody.events) land in the same table, under "global/" and the name.
	function m:hook_global(event_name, handler, priority)
		return self:hook("global/"..event_name, handler, priority);
	end
	function m:wrap_event(event_name, wrapper) self.wrapped[event_name] = wrapper; end
	function m.shared() return {}; end
	function m:depends(dep)
		table.insert(self.dependencies, dep);
		return self.provides and self.provides[dep];
	end
	function m:send(stanza) table.insert(self.sent, stanza); end
	-- Counters as Prosody's module:metric returns them; values in m.metrics[name][label].
	m.metrics = {};
	function m:metric(_, metric_name)
		local counts = {};
		self.metrics[metric_name] = counts;
		return { with_labels = function (_, label)
			return { add = function (_, n) counts[label] = (counts[label] or 0) + n; end };
		end };
	end
	function m:add_timer(delay, fn) self.timer = { delay = delay, fn = fn }; end
	m.sent = {};
	return m;
end

-- Loads lua/<mod>/<mod>.lua into a fresh environment, as Prosody's module loader does.
-- Returns the environment (its globals are the module's exports) and the fake module.
function helpers.load_shim(name, host, options, prosody_table, provides)
	local m = helpers.fake_module(name, host, options);
	m.provides = provides;
	local env = setmetatable({ module = m; prosody = prosody_table or { process_type = "prosody", hosts = {} } },
		{ __index = _G });
	m.environment = env;
	local path = repo.."/lua/mod_"..name.."/mod_"..name..".lua";
	local chunk = assert(loadfile(path, "t", env));
	chunk();
	return env, m;
end

return helpers;
