-- mod_storage_faulty: a storage driver for tests that passes every call through to a real
-- driver, and fails the calls a control file names.
--
--   storage = "faulty"
--   faulty_storage_driver = "internal"          -- or "sql": the driver that does the work
--   faulty_storage_control = "/tmp/…/faults.json"
--
-- The control file (re-read on every call, so a test can change it while Prosody and
-- prosodyctl run) holds a JSON list of rules:
--
--   [ { "store": "invites", "method": "set", "action": "fail", "skip": 1, "times": 1 } ]
--
-- store and method ("*" for any) select the calls; skip lets that many matching calls
-- through first; times bounds how many then fail (absent: all). action "fail" returns
-- nil, "injected fault" as a driver reporting an error does; "raise" throws a Lua error, as
-- a driver with a bug does. Counts start again whenever the file's content changes.

local json = require "util.json";
local storagemanager = require "core.storagemanager";

local inner_name = module:get_option_string("faulty_storage_driver", "internal");
local control_path = module:get_option_string("faulty_storage_control");

local inner = storagemanager.load_driver(module.host, inner_name);
if not inner then
	error("mod_storage_faulty: could not load storage driver "..inner_name);
end

local current_text, rules, seen = nil, {}, {};

local function load_rules()
	local text = "";
	local f = control_path and io.open(control_path);
	if f then
		text = f:read("*a") or "";
		f:close();
	end
	if text ~= current_text then
		current_text, seen = text, {};
		rules = text:match("%S") and json.decode(text) or {};
		if type(rules) ~= "table" then
			module:log("error", "Control file %s is not a JSON list; no faults", control_path);
			rules = {};
		end
	end
	return rules;
end

-- The action for this call, if a rule selects it.
local function fault_for(store_name, method)
	for i, rule in ipairs(load_rules()) do
		if (rule.store == "*" or rule.store == store_name)
		and (rule.method == "*" or rule.method == method) then
			local n = (seen[i] or 0) + 1;
			seen[i] = n;
			local skip = tonumber(rule.skip) or 0;
			local times = tonumber(rule.times);
			if n > skip and (not times or n <= skip + times) then
				return rule.action or "fail";
			end
		end
	end
end

local function wrap_store(store_name, real)
	return setmetatable({}, {
		__index = function (_, method)
			local value = real[method];
			if type(value) ~= "function" then
				return value;
			end
			return function (_, ...)
				local action = fault_for(store_name, method);
				if action == "raise" then
					error(("injected fault (raised) in %s:%s"):format(store_name, method));
				elseif action then
					return nil, ("injected fault in %s:%s"):format(store_name, method);
				end
				return value(real, ...);
			end;
		end;
	});
end

local driver = {};

function driver.open(_, store_name, typ)
	local real, err = inner:open(store_name, typ);
	if not real then
		return real, err;
	end
	return wrap_store(store_name, real);
end

function driver.stores(_, ...)
	return inner:stores(...);
end

function driver.purge(_, ...)
	return inner:purge(...);
end

module:provides("storage", driver);
