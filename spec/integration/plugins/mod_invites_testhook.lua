-- TEST-ONLY module: never load this on a real server.
--
-- Lets an authenticated c2s user call the mod_invites Lua API in-process:
--
--   <iq type='set' to='localhost'>
--     <call xmlns='urn:prosody-invites:test' fn='create_contact'>["romeo", true]</call>
--   </iq>
--
-- reply:
--
--   <iq type='result'><result xmlns='urn:prosody-invites:test'>{JSON}</result></iq>
--
-- JSON fields:
--   raised  true when the call threw a Lua error (err is then the message)
--   ok      true when it did not throw and the first return value is truthy
--   value   first return value (functions removed, tables copied)
--   err     error message when raised, else the second return value when the
--           first one is nil/false
--   values  all return values as an array (nil -> null)
--   n       number of return values
--
-- Besides the functions exported by mod_invites (looked up on the module's
-- environment returned by module:depends("invites")), these helpers exist:
--   is_admin(jid)                  core.usermanager.is_admin(jid, host)
--   user_exists(username)          core.usermanager.user_exists(username, host)
--   get_roles(username)            set of role names (0.12: "roles" store; 13: role API)
--   pending_account_invites()      the iterator collected into an array
--   get_roster(username)           rostermanager.load_roster -> {jid = {subscription, ask, name, groups}}
--   module_info()                  paths of the loaded invites modules
--   deliver_subscribe(from, to, token)
--                                  a subscribe with a <preauth/> from `from` (a remote JID)
--                                  to `to` (bare or full), posted as an inbound stanza
--                                  arrives from another server (no s2s needed)
--   get_primary_role(username)     13 only: the primary role's name
--   group_members(group_id)        what the mod_groups_internal stand-in recorded
--   collect_garbage()              a full Lua GC (finalizes statements a driver left open)
--
-- Must work with both Prosody's own mod_invites and ours.

local st = require "util.stanza";
local json = require "util.json";
local array = require "util.array";
local usermanager = require "core.usermanager";
local rostermanager = require "core.rostermanager";
local modulemanager = require "core.modulemanager";
local unpack = table.unpack or unpack;

local xmlns = "urn:prosody-invites:test";
local host = module.host;

local invites = module:depends("invites");

local function module_path(name)
	local mod = modulemanager.get_module(host, name);
	return mod and mod.module and mod.module.path or "not-loaded";
end

-- Copy a value into something util.json can encode: functions dropped,
-- sequences become JSON arrays, other keys become strings, cycles cut.
local function strip(v, seen)
	local t = type(v);
	if t == "function" or t == "thread" or t == "userdata" then
		if v == json.null then return v; end
		return nil;
	elseif t ~= "table" then
		return v;
	end
	if v == json.null then return v; end
	seen = seen or {};
	if seen[v] then return "<cycle>"; end
	seen[v] = true;
	local n, max, is_seq = 0, 0, true;
	for k in pairs(v) do
		n = n + 1;
		if type(k) == "number" and k >= 1 and k % 1 == 0 then
			if k > max then max = k; end
		else
			is_seq = false;
		end
	end
	local out;
	if is_seq and n > 0 and max == n then
		out = array();
		for i = 1, n do
			local sv = strip(v[i], seen);
			if sv == nil then sv = json.null; end
			out[i] = sv;
		end
	else
		out = {};
		for k, val in pairs(v) do
			local sv = strip(val, seen);
			if sv ~= nil then
				out[type(k) == "string" and k or tostring(k)] = sv;
			end
		end
	end
	seen[v] = nil;
	return out;
end

local helpers = {};

function helpers.is_admin(jid)
	return usermanager.is_admin(jid, host) and true or false;
end

function helpers.user_exists(username)
	return usermanager.user_exists(username, host) and true or false;
end

-- Roles as a set of names on either version.
-- COMPAT: Prosody 13 has a role API (primary + secondary roles); 0.12 a "roles" store.
function helpers.get_roles(username)
	if usermanager.get_user_role then
		local roles = {};
		local primary = usermanager.get_user_role(username, host);
		-- A user without an explicit role gets the host's default one: not from the invite.
		if primary and primary.name ~= "prosody:registered" then
			roles[primary.name] = true;
		end
		for name in pairs(usermanager.get_user_secondary_roles(username, host) or {}) do
			roles[name] = true;
		end
		return next(roles) and roles or nil;
	end
	return module:open_store("roles"):get(username);
end

-- Prosody 13 only: the primary role's name, or nil (0.12 has no primary role).
function helpers.get_primary_role(username)
	if not usermanager.get_user_role then return nil; end
	local primary = usermanager.get_user_role(username, host);
	return primary and primary.name or nil;
end

function helpers.pending_account_invites(...)
	local f = invites.pending_account_invites;
	if not f then return nil, "pending_account_invites not exported"; end
	local iter, state, ctl = f(...);
	local list = array();
	if type(iter) == "table" then -- a list already
		for _, inv in ipairs(iter) do list:push(inv); end
		return list;
	end
	while true do
		local k, v = iter(state, ctl);
		if k == nil then break; end
		ctl = k;
		if v ~= nil then list:push(v); else list:push(k); end
	end
	return list;
end

function helpers.get_roster(username)
	local roster = rostermanager.load_roster(username, host);
	if not roster then return nil, "no roster"; end
	local out = {};
	for jid, item in pairs(roster) do
		if jid then -- roster[false] holds metadata
			local groups = array();
			for g in pairs(item.groups or {}) do groups:push(g); end
			out[jid] = { subscription = item.subscription, ask = item.ask, name = item.name, groups = groups };
		end
	end
	return out;
end

function helpers.collect_garbage()
	collectgarbage("collect");
	collectgarbage("collect");
	return true;
end

function helpers.group_members(group_id)
	return module:open_store("group_members"):get(group_id);
end

function helpers.deliver_subscribe(from, to, token)
	local pres = st.presence({ type = "subscribe", from = from, to = to })
		:tag("preauth", { xmlns = "urn:xmpp:pars:0", token = token }):up();
	-- Posted by the host itself, as stanzas from other servers are: inbound handlers only.
	prosody.core_post_stanza(prosody.hosts[host], pres);
	return true;
end

function helpers.module_info()
	return {
		invites = module_path("invites");
		invites_register = module_path("invites_register");
		host = host;
	};
end

-- More helpers from other test modules (mod_thirdparty_testhook), answered the same way.
function add_helpers(more)
	for name, fn in pairs(more) do
		helpers[name] = fn;
	end
end

local function pack(...) return { n = select("#", ...), ... }; end

local function handle_call(event)
	local origin, stanza = event.origin, event.stanza;
	if origin.type ~= "c2s" then
		origin.send(st.error_reply(stanza, "auth", "forbidden", "authenticated c2s only"));
		return true;
	end
	local call = stanza.tags[1];
	local fn_name = call.attr.fn;
	local ok_args, args = pcall(json.decode, call:get_text() ~= "" and call:get_text() or "[]");
	if not ok_args or type(args) ~= "table" then
		origin.send(st.error_reply(stanza, "modify", "bad-request", "body must be a JSON array"));
		return true;
	end
	local nargs = 0;
	for k in pairs(args) do
		if type(k) == "number" and k > nargs then nargs = k; end
	end
	local plain_args = {};
	for i = 1, nargs do
		local a = args[i];
		if a == json.null then a = nil; end
		plain_args[i] = a;
	end

	local fn = helpers[fn_name] or (type(invites[fn_name]) == "function" and invites[fn_name]);
	local res;
	if not fn then
		res = { raised = true, ok = false, err = "no such function: "..tostring(fn_name), n = 0, values = array() };
	else
		local rets = pack(pcall(fn, unpack(plain_args, 1, nargs)));
		if not rets[1] then
			res = { raised = true, ok = false, err = tostring(rets[2]), n = 0, values = array() };
		else
			local values = array();
			for i = 2, rets.n do
				local sv = strip(rets[i]);
				if sv == nil then sv = json.null; end
				values[i - 1] = sv;
			end
			local first, second = rets[2], rets[3];
			res = {
				raised = false;
				ok = not not first;
				value = strip(first);
				err = (not first) and strip(second) or nil;
				values = values;
				n = rets.n - 1;
			};
		end
	end
	module:log("debug", "testhook call %s -> ok=%s", tostring(fn_name), tostring(res.ok));
	origin.send(st.reply(stanza):text_tag("result", json.encode(res), { xmlns = xmlns }));
	return true;
end

module:hook("iq-set/host/"..xmlns..":call", handle_call);
module:hook("iq-set/self/"..xmlns..":call", handle_call);

local function announce()
	module:log("info", "invites_testhook ready: mod_invites=%s mod_invites_register=%s",
		module_path("invites"), module_path("invites_register"));
end

if prosody.main_thread then
	-- loaded into a running server (module reload): announce on the next tick
	module:add_timer(0, announce);
else
	module:hook_global("server-started", announce);
end
