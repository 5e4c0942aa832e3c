-- BENCHMARK-ONLY module: never load this on a real server.
--
-- Times the mod_invites Lua API (ours or Prosody's own) from inside the server, so that
-- no IPC is part of any per-operation timing. Driven by bench/run.py over c2s:
--
--   <iq type='set' to='localhost'>
--     <bench xmlns='urn:prosody-invites:bench' op='fill' n='1000' budget='8'/>
--   </iq>
--
-- reply: <iq type='result'><result xmlns='urn:prosody-invites:bench'>{JSON}</result></iq>
--
-- ops (attributes):
--   info                              clock, Lua memory, pending counter, loaded module paths
--   fill      n, budget               create_account() until the bench's pending counter is n
--                                     or `budget` seconds have passed (call again to go on)
--   measure   what, samples, budget   time `what` (below) up to `samples` times; raw samples
--                                     in microseconds are returned (the driver aggregates)
--   list      reps, budget            full pending_account_invites() iterations: time and
--                                     Lua memory (collectgarbage "count") sampled per item
--   tokens    n                       create n account invites (untimed), return their tokens
--   adjust    delta                   correct the pending counter (after registrations)
--   gc                                full garbage collection (before a timed burst)
--   prune                             call mod_invites' prune(0) if it exports one (ours):
--                                     drops used/revoked records left by the measurements
--
-- `what` for measure:
--   create_delete   time create_account(), then delete_account_invite() of that token
--                   (two sample sets; the pending count is unchanged afterwards)
--   get_valid       get(token) of a random pending invite from the fill (reservoir)
--   get_unknown     get(token) of a random well-formed token that does not exist
--   redeem          create_account() untimed, then time get(token) + invite:use()
--   create_contact  time create_contact(inviter, true), then delete_account_invite() untimed
--
-- The module keeps only a bounded reservoir of tokens (not all N), so its own memory
-- does not grow with N.

local array = require "util.array";
local id = require "util.id";
local time = require "util.time";
local modulemanager = require "core.modulemanager";

local xmlns = "urn:prosody-invites:bench";
local host = module.host;

local invites = module:depends("invites");

-- Monotonic clock with sub-microsecond resolution when available (Prosody 0.12 has
-- util.time.monotonic, CLOCK_MONOTONIC); util.time.now (wall clock, double seconds,
-- about 0.5 us resolution at current epoch values) otherwise.
local clock = time.monotonic or time.now;
local clock_name = time.monotonic and "util.time.monotonic" or "util.time.now";

local function clock_resolution()
	local best = math.huge;
	for _ = 1, 50 do
		local a = clock();
		local b = clock();
		while b == a do b = clock(); end
		if b - a < best then best = b - a; end
	end
	return best;
end

-- Long enough that nothing expires during a run.
local TTL = 30 * 86400;
local RESERVOIR_SIZE = 1000;

local pending = 0; -- account invites created by this module and still pending
local seen = 0; -- tokens offered to the reservoir
local reservoir = {};
local step = 0; -- distinct inviter per measurement round for create_contact

local function module_path(name)
	local mod = modulemanager.get_module(host, name);
	return mod and mod.module and mod.module.path or "not-loaded";
end

local function offer(token)
	seen = seen + 1;
	if #reservoir < RESERVOIR_SIZE then
		reservoir[#reservoir + 1] = token;
	else
		local j = math.random(1, seen);
		if j <= RESERVOIR_SIZE then reservoir[j] = token; end
	end
end

local function create_account()
	local invite, err = invites.create_account(nil, nil, TTL);
	if not invite then error("create_account failed: "..tostring(err)); end
	return invite.token;
end

local function us(seconds) return seconds * 1e6; end

local ops = {};

function ops.info()
	return {
		clock = clock_name;
		clock_resolution_us = us(clock_resolution());
		lua_kb = collectgarbage("count");
		pending = pending;
		reservoir = #reservoir;
		invites = module_path("invites");
		invites_register = module_path("invites_register");
		has_prune = type(rawget(invites, "prune")) == "function";
	};
end

function ops.fill(attr)
	local target = assert(tonumber(attr.n), "n");
	local budget = tonumber(attr.budget) or 8;
	local t0 = clock();
	local deadline = t0 + budget;
	local created = 0;
	local last_us;
	while pending < target do
		local a = clock();
		offer(create_account());
		local b = clock();
		last_us = us(b - a);
		pending = pending + 1;
		created = created + 1;
		if b > deadline then break; end
	end
	return {
		created = created;
		pending = pending;
		elapsed = clock() - t0;
		last_create_us = last_us;
		done = pending >= target;
	};
end

local measures = {};

function measures.create_delete(samples, budget)
	local create, delete = array(), array();
	local deadline = clock() + budget;
	for _ = 1, samples do
		local a = clock();
		local invite, err = invites.create_account(nil, nil, TTL);
		local b = clock();
		if not invite then error("create_account failed: "..tostring(err)); end
		local ok, derr = invites.delete_account_invite(invite.token);
		local c = clock();
		if not ok then error("delete_account_invite failed: "..tostring(derr)); end
		create:push(us(b - a));
		delete:push(us(c - b));
		if c > deadline then break; end
	end
	return { create_account = create, delete_account_invite = delete };
end

-- At N = 0 there is no invite from the fill: one is created for the measurement and
-- deleted afterwards.
function measures.get_valid(samples, budget)
	local pool, temporary = reservoir, nil;
	if #pool == 0 then
		temporary = create_account();
		pool = { temporary };
	end
	local out = array();
	local deadline = clock() + budget;
	for _ = 1, samples do
		local token = pool[math.random(1, #pool)];
		local a = clock();
		local invite, err = invites.get(token);
		local b = clock();
		if not invite then error("get(valid) failed: "..tostring(err)); end
		out:push(us(b - a));
		if b > deadline then break; end
	end
	if temporary then invites.delete_account_invite(temporary); end
	return { get_valid = out };
end

function measures.get_unknown(samples, budget)
	local out = array();
	local deadline = clock() + budget;
	for _ = 1, samples do
		local token = id.long(); -- 24 characters of base64url, like a real token
		local a = clock();
		local invite = invites.get(token);
		local b = clock();
		if invite then error("get(unknown) found an invite"); end
		out:push(us(b - a));
		if b > deadline then break; end
	end
	return { get_unknown = out };
end

function measures.redeem(samples, budget)
	local out = array();
	local deadline = clock() + budget;
	for _ = 1, samples do
		local token = create_account();
		local a = clock();
		local invite, err = invites.get(token);
		if not invite then error("get(fresh) failed: "..tostring(err)); end
		local ok, uerr = invite:use();
		local b = clock();
		if not ok then error("use() failed: "..tostring(uerr)); end
		out:push(us(b - a));
		if b > deadline then break; end
	end
	return { redeem = out };
end

function measures.create_contact(samples, budget)
	local out = array();
	local deadline = clock() + budget;
	local inviter = "benchinviter"..step;
	for _ = 1, samples do
		local a = clock();
		local invite, err = invites.create_contact(inviter, true, nil, TTL);
		local b = clock();
		if not invite then error("create_contact failed: "..tostring(err)); end
		invites.delete_account_invite(invite.token);
		out:push(us(b - a));
		if clock() > deadline then break; end
	end
	return { create_contact = out };
end

function ops.measure(attr)
	local what = attr.what;
	local f = measures[what];
	if not f then error("unknown measure: "..tostring(what)); end
	local samples = tonumber(attr.samples) or 100;
	local budget = tonumber(attr.budget) or 8;
	if attr.step then step = tonumber(attr.step) or step; end
	local t0 = clock();
	local res = f(samples, budget);
	return { samples = res, elapsed = clock() - t0, pending = pending };
end

-- One full iteration of pending_account_invites(), Lua memory sampled at every item.
local function list_once()
	collectgarbage("collect");
	collectgarbage("collect");
	local base = collectgarbage("count");
	local peak = base;
	local count = 0;
	local a = clock();
	local iter, state, ctl = invites.pending_account_invites();
	while true do
		local k = iter(state, ctl);
		if k == nil then break; end
		ctl = k;
		count = count + 1;
		local m = collectgarbage("count");
		if m > peak then peak = m; end
	end
	local b = clock();
	local after = collectgarbage("count");
	if after > peak then peak = after; end
	-- the count sampling itself is part of the timed loop; it costs well under 1 us per item
	return { us = us(b - a), items = count, base_kb = base, peak_delta_kb = peak - base };
end

function ops.list(attr)
	local reps = tonumber(attr.reps) or 3;
	local budget = tonumber(attr.budget) or 8;
	local deadline = clock() + budget;
	local runs = array();
	for _ = 1, reps do
		runs:push(list_once());
		if clock() > deadline then break; end
	end
	return { runs = runs };
end

function ops.tokens(attr)
	local n = assert(tonumber(attr.n), "n");
	local out = array();
	for _ = 1, n do
		out:push(create_account());
	end
	pending = pending + n;
	return { tokens = out, pending = pending };
end

-- A full collection, so that the next timed burst pays for no garbage made before it.
function ops.gc()
	collectgarbage("collect");
	return { lua_kb = collectgarbage("count") };
end

function ops.adjust(attr)
	pending = pending + (tonumber(attr.delta) or 0);
	return { pending = pending };
end

function ops.prune()
	local prune = rawget(invites, "prune"); -- not part of Prosody's API: ours only
	if type(prune) ~= "function" then
		return { supported = false };
	end
	local t0 = clock();
	local removed, err = prune(0);
	if not removed then error("prune failed: "..tostring(err)); end
	return { pruned = removed, supported = true, elapsed = clock() - t0 };
end

module:require("bench_iq")(module, xmlns, "bench", ops);
