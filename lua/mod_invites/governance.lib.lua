-- Invite governance of mod_invites, loaded with module:require("governance").
--
-- Who made each invite (provenance), how many invites an account may make (quotas and a
-- cool-down after registration), the invite tree (who invited whom), what happens to an
-- account's invites when it is deleted, and the inviter told of a sign-up. The core keeps
-- the records and decides (src/book.rs: charge, account entries, revoke_by); this file
-- reads options, knows roles and sends the message.
--
-- Returns function (ctx) → governance, where ctx gives book() (the host's invite book),
-- period(value, min, can_be_off) (the core's period reader) and has_role_api.

local jid_split = require "util.jid".split;
local nodeprep = require "util.encodings".stringprep.nodeprep;
local st = require "util.stanza";
local usermanager = require "core.usermanager";
local pack = table.pack or function (...) return { n = select("#", ...), ... }; end;
local unpack = table.unpack or unpack;

return function (ctx)

--- Options

-- invite_quota: per role, how many invites an account may create per period, e.g.
-- { ["prosody:registered"] = { 5, "30 days" } }. A role without an entry takes the entry of
-- prosody:registered, except admins and operators, who are not limited unless named.
local exempt_roles = { ["prosody:admin"] = true, ["prosody:operator"] = true };
local quotas, wait_after_registration, notify_inviter;

local function quota_entry(entry)
	if type(entry) ~= "table" then
		return nil, "a table { count, period } is expected";
	end
	local limit = entry[1] or entry.count;
	if type(limit) ~= "number" or limit < 0 or limit ~= math.floor(limit) or limit > 2^31 then
		return nil, "the count is not a whole number of at least 0";
	end
	local period, err = ctx.period(entry[2] or entry.period, 1);
	if not period then
		return nil, "the period is not usable ("..tostring(err)..")";
	end
	return { limit = limit, period = period };
end

local function read_options()
	quotas = {};
	local configured = module:get_option("invite_quota", {});
	if type(configured) ~= "table" then
		module:log("error", "Option invite_quota is not a table of roles; no invite quota applies");
		configured = {};
	end
	for role, entry in pairs(configured) do
		local quota, err = quota_entry(entry);
		if quota then
			quotas[role] = quota;
		else
			module:log("error", "Option invite_quota[%q]: %s; no quota for that role", tostring(role), err);
		end
	end
	local wait = module:get_option("invite_wait_after_registration", false);
	local seconds, err = ctx.period(wait, 1, true);
	if err then
		module:log("error", "Option invite_wait_after_registration = %q is not a usable period (%s); no wait applies",
			tostring(wait), err);
		seconds = nil;
	end
	wait_after_registration = seconds;
	notify_inviter = module:get_option_boolean("invite_notify_inviter", false);
end
read_options();

--- Provenance

-- At most `n` bytes of `s`, cut before a UTF-8 sequence that would not fit whole.
local function cut(s, n)
	if #s <= n then return s; end
	s = s:sub(1, n);
	local lead = s:find("[\192-\247][\128-\191]*$");
	if lead then
		local b = s:byte(lead);
		local length = b >= 240 and 4 or b >= 224 and 3 or 2;
		if #s - lead + 1 < length then
			s = s:sub(1, lead - 1);
		end
	end
	return s;
end

-- The admin front end running in this thread, if any ("prosodyctl", "shell", "console"):
-- its invites are the admin's, whoever they are for. Per thread, as a command may wait.
local acting = setmetatable({}, { __mode = "k" });
local function main_thread() return "main"; end

local function acting_source()
	return acting[coroutine.running() or main_thread()];
end

-- Runs f(...) as `source`; returns what f returns.
local function as_source(source, f, ...)
	local thread = coroutine.running() or main_thread();
	local before = acting[thread];
	acting[thread] = source;
	local result = pack(f(...));
	acting[thread] = before;
	return unpack(result, 1, result.n);
end

-- (creator, source, note) of a new invite: the local account it is made for or by (a
-- contact invite's inviter; the account of additional_data.source when that is a JID of
-- this host), through what it was made (the admin front end, else additional_data.source),
-- and mod_http_admin_api's note (additional_data.note), cut to what the core keeps.
local function provenance(additional_data, inviter)
	local data = type(additional_data) == "table" and additional_data or {};
	local source, note = data.source, data.note;
	source = type(source) == "string" and source ~= "" and cut(source, 256) or nil;
	note = type(note) == "string" and note ~= "" and cut(note, 1024) or nil;
	local creator = inviter;
	if not creator and source then
		local node, host = jid_split(source);
		if node and host == module.host then
			creator = nodeprep(node);
		end
	end
	return creator, acting_source() or source, note;
end

--- Quotas and cool-down

-- The account's role name: 13's primary role; on 0.12, admin or registered.
local function role_of(username)
	if ctx.has_role_api then
		local role = usermanager.get_user_role(username, module.host);
		return role and role.name or "prosody:registered";
	end
	return usermanager.is_admin(username.."@"..module.host, module.host) and "prosody:admin" or "prosody:registered";
end

local function rule_for(username)
	local role = role_of(username);
	local rule = {};
	local quota = quotas[role];
	if quota == nil and not exempt_roles[role] then
		quota = quotas["prosody:registered"];
	end
	if quota then
		rule.limit, rule.period = quota.limit, quota.period;
	end
	if wait_after_registration and not exempt_roles[role] then
		rule.wait = wait_after_registration;
	end
	return rule;
end

-- May `creator` make one more invite now? Invites made by an admin front end are not
-- counted. true and the charge (for refund), or nil, "quota-exceeded" | "too-soon", the
-- time it may try again (or nil, a storage error).
local function charge(creator)
	if not creator or acting_source() or not (next(quotas) or wait_after_registration) then
		return true;
	end
	local rule = rule_for(creator);
	if not (rule.limit or rule.wait) then
		return true;
	end
	local now = os.time();
	local ok, err, retry_at = ctx.book():charge(creator, rule, now);
	if not ok then
		module:log("info", "Invite for %s@%s refused: %s", creator, module.host, err);
		return nil, err, retry_at;
	end
	return true, { creator = creator, at = now };
end

-- The invite `charge` counted was not made after all (storage failed): it counts no more.
local function refund(charged)
	if type(charged) == "table" then
		ctx.book():refund(charged.creator, charged.at);
	end
end

--- Events of accounts

if prosody.process_type == "prosody" then
	-- Registered without an invite: the time counts for invite_wait_after_registration.
	-- With one, the core writes the account's entry when the invite is redeemed.
	module:hook("user-registered", function (event)
		if event.validated_invite or (event.session and event.session.validated_invite) then return; end
		ctx.book():account_registered(event.username, os.time());
	end, -20);

	-- An account's pending invites go with it; its place in the tree stays. Prosody fires
	-- user-deleted globally, for every host.
	module:hook_global("user-deleted", function (event)
		if event.host ~= module.host then return; end
		local revoked, err = ctx.book():account_deleted(event.username, os.time());
		if not revoked then
			module:log("error", "Could not revoke the invites of deleted account %s: %s", event.username, err);
		elseif revoked > 0 then
			module:log("info", "Revoked %d pending invites of deleted account %s", revoked, event.username);
		end
	end);
end

-- After an invite made for a local account registered `username`: tell that account
-- (invite_notify_inviter), once per redemption.
local function redeemed(invite, username)
	if not notify_inviter or not invite.creator or invite.reset then return; end
	local new_jid = username.."@"..module.host;
	module:send(st.message({ from = module.host, to = invite.creator.."@"..module.host, type = "chat" })
		:text_tag("body", ("%s has signed up with your invitation."):format(new_jid)));
end

return {
	read_options = read_options;
	provenance = provenance;
	as_source = as_source;
	charge = charge;
	refund = refund;
	redeemed = redeemed;
};

end
