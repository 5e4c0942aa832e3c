-- BENCHMARK-ONLY module: never load this on a real server.
--
-- Interleaved A/B of the mod_invites Lua API inside ONE Prosody: our mod_invites on this
-- host, Prosody's own (mod_invites_stock, its file loaded under another name) on the host
-- `invites_ab_stock_host`, and optionally ours again with invites_storage_lock = false on
-- `invites_ab_unlocked_host`. Every sample calls each implementation once, in an order that
-- rotates from sample to sample, so all see the same process, heap, disk and database state.
-- Driven by bench/ab.py over c2s (one iq per step, as mod_invites_bench.lua):
--
--   <iq type='set' to='localhost'><ab xmlns='urn:prosody-invites:ab' op='…' …/></iq>
--   reply: <result xmlns='urn:prosody-invites:ab'>{JSON}</result>
--
-- ops: info; seed (stock invites for the migration check); count (pending per impl, by
-- iterating); verify (tokens of one impl unknown to the others); fill (n, budget);
-- measure (what, samples, budget); list (reps, budget); listmem; prune; clear_stock.

local json = require "util.json";
local id = require "util.id";
local time = require "util.time";
local modulemanager = require "core.modulemanager";
local storagemanager = require "core.storagemanager";

local xmlns = "urn:prosody-invites:ab";
local clock = time.monotonic or time.now;
local TTL = 30 * 86400;
local RESERVOIR = 1000;

local stock_host = module:get_option_string("invites_ab_stock_host");
local unlocked_host = module:get_option_string("invites_ab_unlocked_host");

local function us(seconds) return seconds * 1e6; end

local function module_env(host, name)
	local mod = modulemanager.get_module(host, name);
	if not mod then error(("module %s not loaded on %s"):format(name, host)); end
	return mod;
end

-- One implementation under test: its module environment, how many account invites it has
-- pending (made here), and a reservoir of their tokens for get(valid).
local impls, by_name = {}, {};
local function add_impl(name, host, module_name)
	local impl = { name = name; host = host; module_name = module_name; pending = 0; seen = 0; reservoir = {} };
	impls[#impls + 1] = impl;
	by_name[name] = impl;
end
add_impl("ours", module.host, "invites");
if stock_host then add_impl("stock", stock_host, "invites_stock"); end
if unlocked_host then add_impl("unlocked", unlocked_host, "invites"); end

local function mod(impl)
	if not impl.mod then impl.mod = module_env(impl.host, impl.module_name); end
	return impl.mod;
end

local function offer(impl, token)
	impl.seen = impl.seen + 1;
	local r = impl.reservoir;
	if #r < RESERVOIR then
		r[#r + 1] = token;
	else
		local j = math.random(1, impl.seen);
		if j <= RESERVOIR then r[j] = token; end
	end
end

local function create(impl)
	local invite, err = mod(impl).create_account(nil, nil, TTL);
	if not invite then error(impl.name..": create_account failed: "..tostring(err)); end
	return invite.token;
end

local function storage_of(host)
	local config = require "core.configmanager";
	local s = config.get(host, "storage");
	return type(s) == "table" and (s.invite_token or s.invites or "default") or tostring(s);
end

local ops = {};

function ops.info()
	local out = { clock = time.monotonic and "util.time.monotonic" or "util.time.now"; impls = {} };
	local config = require "core.configmanager";
	for _, impl in ipairs(impls) do
		local m = mod(impl);
		out.impls[impl.name] = {
			host = impl.host;
			path = m.module.path;
			file = rawget(m, "invites_stock_file");
			pending = impl.pending;
			storage = storage_of(impl.host);
			storage_lock = config.get(impl.host, "invites_storage_lock");
		};
	end
	out.lua_kb = collectgarbage("count");
	return out;
end

-- Pending account invites per impl, by iterating pending_account_invites().
function ops.count()
	local out = {};
	for _, impl in ipairs(impls) do
		local n = 0;
		for _ in mod(impl).pending_account_invites() do n = n + 1; end
		out[impl.name] = n;
	end
	return out;
end

-- n invites of Prosody's own module, through its API (for the migration check).
function ops.seed(attr)
	local tokens = {};
	for i = 1, tonumber(attr.n) or 5 do tokens[i] = create(by_name.stock); end
	return { tokens = tokens };
end

-- Each of `tokens` (JSON list) checked with get() on every impl.
function ops.verify(attr)
	local tokens = json.decode(attr.tokens);
	local out = {};
	for _, impl in ipairs(impls) do
		local found = 0;
		for _, token in ipairs(tokens) do
			if mod(impl).get(token) then found = found + 1; end
		end
		out[impl.name] = found;
	end
	return out;
end

function ops.clear_stock(attr)
	for _, token in ipairs(json.decode(attr.tokens)) do
		mod(by_name.stock).delete_account_invite(token);
	end
	return { ok = true };
end

--- Fill

-- Prosody's own module keeps every account invite of a host in one record (its map store on
-- a keyval shim): on internal storage each create_account() reads and rewrites a file of all
-- of them, so a fill through the API takes O(N^2) time. Its invites are made by its own
-- create_account() with its storage handle swapped for a collector, then written in one
-- keyval set: the same records, in the same store, as N calls would have left.
local function upvalue(f, name)
	for i = 1, 255 do
		local n, v = debug.getupvalue(f, i);
		if n == nil then return nil; end
		if n == name then return i, v; end
	end
end

local function stock_bulk_fill(impl, count)
	local m = mod(impl);
	local ci, create_invite = upvalue(m.create_account, "create_invite");
	local si, real;
	if ci then si, real = upvalue(create_invite, "token_storage"); end
	if not (si and real) then
		error("stock bulk fill: Prosody's mod_invites has no create_invite/token_storage upvalue (changed?)");
	end
	local batch = {};
	debug.setupvalue(create_invite, si, {
		set = function (_, user, key, value)
			if user == nil then batch[key] = value; end
			return true;
		end;
	});
	local ok, err = pcall(function ()
		for _ = 1, count do create(impl); end
	end);
	debug.setupvalue(create_invite, si, real);
	if not ok then error(err); end
	local keyval = storagemanager.open(impl.host, "invite_token");
	local all = keyval:get(nil) or {};
	for token, invite in pairs(batch) do
		all[token] = invite;
		offer(impl, token);
	end
	assert(keyval:set(nil, all));
	impl.pending = impl.pending + count;
end

function ops.fill(attr)
	local target = assert(tonumber(attr.n), "n");
	local deadline = clock() + (tonumber(attr.budget) or 8);
	local out = { done = true; created = {}; elapsed = {} };
	for _, impl in ipairs(impls) do
		local t0 = clock();
		local made = 0;
		if impl.name == "stock" and impl.pending < target then
			made = target - impl.pending;
			stock_bulk_fill(impl, made);
		else
			while impl.pending < target and clock() < deadline do
				offer(impl, create(impl));
				impl.pending = impl.pending + 1;
				made = made + 1;
			end
		end
		out.created[impl.name] = made;
		out.elapsed[impl.name] = clock() - t0;
		if impl.pending < target then out.done = false; end
	end
	local pending = {};
	for _, impl in ipairs(impls) do pending[impl.name] = impl.pending; end
	out.pending = pending;
	return out;
end

--- Measurements: each returns { metric = µs, … } for one call of one impl.

local step = 0; -- a fresh inviter per measurement call, for create_contact

local measures = {};

function measures.create_delete(impl)
	local m = mod(impl);
	local a = clock();
	local invite, err = m.create_account(nil, nil, TTL);
	local b = clock();
	if not invite then error(impl.name..": create_account failed: "..tostring(err)); end
	local ok, derr = m.delete_account_invite(invite.token);
	local c = clock();
	if not ok then error(impl.name..": delete_account_invite failed: "..tostring(derr)); end
	return { create_account = us(b - a), delete_account_invite = us(c - b) };
end

function measures.get_valid(impl)
	local r = impl.reservoir;
	local temporary;
	if #r == 0 then temporary = create(impl); end
	local token = temporary or r[math.random(1, #r)];
	local a = clock();
	local invite, err = mod(impl).get(token);
	local b = clock();
	if not invite then error(impl.name..": get(valid) failed: "..tostring(err)); end
	if temporary then mod(impl).delete_account_invite(temporary); end
	return { get_valid = us(b - a) };
end

function measures.get_unknown(impl)
	local token = id.long(); -- 24 characters of base64url, like a real token
	local a = clock();
	local invite = mod(impl).get(token);
	local b = clock();
	if invite then error(impl.name..": get(unknown) found an invite"); end
	return { get_unknown = us(b - a) };
end

-- A token longer than any (over 1,024 bytes): ours refuses it before storage, so this is
-- the cost of the shim and the core alone; Prosody's own looks it up all the same.
local overlong = ("x"):rep(1025);
function measures.get_malformed(impl)
	local a = clock();
	local invite = mod(impl).get(overlong);
	local b = clock();
	if invite then error(impl.name..": get(over-long) found an invite"); end
	return { get_malformed = us(b - a) };
end

function measures.redeem(impl)
	local token = create(impl);
	local a = clock();
	local invite, err = mod(impl).get(token);
	if not invite then error(impl.name..": get(fresh) failed: "..tostring(err)); end
	local ok, uerr = invite:use();
	local b = clock();
	if not ok then error(impl.name..": use() failed: "..tostring(uerr)); end
	return { redeem = us(b - a) };
end

function measures.create_contact(impl)
	local m = mod(impl);
	local a = clock();
	local invite, err = m.create_contact("abinviter"..step, true, nil, TTL);
	local b = clock();
	if not invite then error(impl.name..": create_contact failed: "..tostring(err)); end
	m.delete_account_invite(invite.token);
	return { create_contact = us(b - a) };
end

-- Every order of the impls, cycled through sample by sample, so none is always first or
-- always right after another. Before each call the heap is collected in full (untimed):
-- Prosody's own reads the whole store on internal storage, megabytes of garbage per call at
-- large N, and whoever allocated next would pay the collector for it. So no timing includes
-- the collection of garbage, its own included.
local orders = {};
local function permute(list, n)
	if n <= 1 then
		local copy = {};
		for i, v in ipairs(list) do copy[i] = v; end
		orders[#orders + 1] = copy;
		return;
	end
	for i = 1, n do
		list[i], list[n] = list[n], list[i];
		permute(list, n - 1);
		list[i], list[n] = list[n], list[i];
	end
end
do
	local copy = {};
	for i, impl in ipairs(impls) do copy[i] = impl; end
	permute(copy, #copy);
end

-- `samples` rounds of one call per impl, in an order that changes from sample to sample;
-- stops early (after at least one call each) when `budget` seconds have passed.
function ops.measure(attr)
	local f = measures[attr.what];
	if not f then error("unknown measure: "..tostring(attr.what)); end
	local samples = tonumber(attr.samples) or 20;
	local deadline = clock() + (tonumber(attr.budget) or 8);
	local rotate = tonumber(attr.offset) or 0;
	step = step + 1;
	local out = {};
	for _, impl in ipairs(impls) do out[impl.name] = {}; end
	local done = 0;
	for i = 1, samples do
		for _, impl in ipairs(orders[(i + rotate) % #orders + 1]) do
			-- A full collection first (untimed), so no call pays for garbage another left.
			collectgarbage("collect");
			for metric, value in pairs(f(impl)) do
				local xs = out[impl.name][metric];
				if not xs then xs = {}; out[impl.name][metric] = xs; end
				xs[#xs + 1] = value;
			end
		end
		done = i;
		if clock() > deadline then break; end
	end
	return { samples = out, calls = done };
end

--- Listing

local function walk(impl, every, on_row)
	local n = 0;
	for _ in mod(impl).pending_account_invites() do
		n = n + 1;
		if every and n % every == 0 then on_row(); end
	end
	return n;
end

-- Full iterations of pending_account_invites(), the impls alternating.
function ops.list(attr)
	local reps = tonumber(attr.reps) or 3;
	local deadline = clock() + (tonumber(attr.budget) or 8);
	local out = {};
	for _, impl in ipairs(impls) do out[impl.name] = { ms = {}; items = 0 }; end
	for i = 1, reps do
		for _, impl in ipairs(orders[i % #orders + 1]) do
			collectgarbage("collect");
			local a = clock();
			local n = walk(impl);
			local b = clock();
			local o = out[impl.name];
			o.ms[#o.ms + 1] = (b - a) * 1e3;
			o.items = n;
		end
		if clock() > deadline then break; end
	end
	return out;
end

-- The Lua heap's peak above its baseline while f runs: a full collection, then the count,
-- at every call of sample(); the baseline is the count after a full collection before f.
local function heap_peak(f)
	collectgarbage("collect");
	collectgarbage("collect");
	local base = collectgarbage("count");
	local peak, samples = base, 0;
	local function sample()
		collectgarbage("collect");
		local kb = collectgarbage("count");
		if kb > peak then peak = kb; end
		samples = samples + 1;
	end
	local ok, result = pcall(f, sample);
	sample(); -- what f still holds when it returns (its result, e.g. the list's lines)
	if not ok then error(result); end
	return { peak_kb = peak - base; base_kb = base; samples = samples; result = result };
end

-- Our `list` command (prosodyctl mod_invites list HOST; 0.12's console invite:list, 13's
-- shell): its walk is inside the command, so samples come from a count hook, every
-- `instructions` Lua VM instructions of this coroutine (calibrated by ops.listmem to about
-- 1,000 rows).
local function our_list_command(host)
	local registry = module:shared("/*/invites/console_commands")[host]; -- 0.12's console front end
	if registry and registry.list then
		return function (print) return registry.list.run(print, host, {}); end;
	end
	for _, item in ipairs(module:get_host_items("shell-command")) do -- 13's shell
		if item.section == "invite" and item.name == "list" then
			return function (print) return item.handler({ session = { print = print } }, host, {}); end;
		end
	end
end

-- Runs the list command with `hook` every `instructions` VM instructions; `returned`, if
-- given, is called while what the command returned (its lines) is still held.
local function run_list(run, instructions, hook, returned)
	local printed = 0;
	local function print() printed = printed + 1; end
	debug.sethook(hook, "", instructions);
	local ok, res = pcall(run, print);
	debug.sethook();
	if not ok then error(res); end
	if returned then returned(); end
	return type(res) == "table" and #res or printed;
end

function ops.listmem(attr)
	local out = {};
	local which = attr.impls and json.decode(attr.impls) or { "ours", "stock" };
	for _, name in ipairs(which) do
		local impl = by_name[name];
		if impl then
			local rows;
			local r = heap_peak(function (sample)
				rows = walk(impl, 1000, sample);
			end);
			out[name.." pending_account_invites"] = { peak_kb = r.peak_kb; base_kb = r.base_kb; samples = r.samples; rows = rows };
			local run = impl.module_name == "invites" and our_list_command(impl.host);
			if run then
				-- calibrate: VM instructions per listed row, counted in steps of 1,000
				local ticks = 0;
				local lines = run_list(run, 1000, function () ticks = ticks + 1; end);
				local per_row = lines > 1 and ticks * 1000 / (lines - 1) or 0;
				local every = math.max(10000, math.floor(per_row * 1000));
				local lr = heap_peak(function (sample)
					return run_list(run, every, sample, sample);
				end);
				out[name.." list"] = { peak_kb = lr.peak_kb; base_kb = lr.base_kb; samples = lr.samples;
					rows = lr.result; instructions_per_row = per_row };
			end
		end
	end
	return out;
end

-- Which storage functions one call of each measure makes, per impl: a call hook counts the
-- Lua functions of the storage layer (mod_storage_*, util.sql, util.datamanager, our
-- storage.lib.lua) entered while it runs. Untimed.
local function layer(src)
	return src:match("(mod_storage_[%w_]+)%.lua$") or src:match("util/(sql)%.lua$")
		or src:match("util/(datamanager)%.lua$") or src:match("(storage)%.lib%.lua$");
end

local function count_calls(f)
	local counts = {};
	debug.sethook(function ()
		local info = debug.getinfo(2, "Sn");
		local where = info and layer(info.short_src);
		if where then
			local key = where..":"..(info.name or "?");
			counts[key] = (counts[key] or 0) + 1;
		end
	end, "c");
	local ok, err = pcall(f);
	debug.sethook();
	if not ok then error(err); end
	return counts;
end

function ops.calls()
	local out = {};
	for _, impl in ipairs(impls) do
		out[impl.name] = {};
		for what, f in pairs(measures) do
			out[impl.name][what] = count_calls(function () f(impl); end);
		end
	end
	return out;
end

function ops.prune()
	local out = {};
	for _, impl in ipairs(impls) do
		local prune = rawget(mod(impl), "prune"); -- ours only
		if type(prune) == "function" then
			local removed, err = prune(0);
			if not removed then error(impl.name..": prune failed: "..tostring(err)); end
			out[impl.name] = removed;
		end
	end
	return out;
end

module:require("bench_iq")(module, xmlns, "ab", ops);
