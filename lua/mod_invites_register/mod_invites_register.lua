-- mod_invites_register: registration through invites (XEP-0401/XEP-0445) and
-- pre-authenticated subscriptions (XEP-0379), on top of our mod_invites.
--
-- Every decision (is this token valid, may this account be created with it, has its use
-- been spent) is made by mod_invites' Rust core; this file wires the hooks and turns the
-- answers into stanzas, roster changes and roles. A use is reserved when registration is
-- about to happen and spent only once the account exists, so a failed registration never
-- consumes an invite and one single-use invite never creates two accounts.

local st = require "util.stanza";
local errors = require "util.error";
local jid_split = require "util.jid".split;
local jid_bare = require "util.jid".bare;
local rostermanager = require "core.rostermanager";
local usermanager = require "core.usermanager";
local modulemanager = require "core.modulemanager";

-- COMPAT: Prosody 13 has a role API (primary role + secondary roles; invites carry a list);
-- 0.12 keeps a set of role names per user in the "roles" store. Invites may carry either
-- shape (made by 0.12 or 13 tooling), so both are read on both versions. A list keeps its
-- order (primary role first); the names of a set follow in sorted order, so which of them
-- becomes the primary role on 13 does not depend on table order.
local function role_names(roles)
	local list, set_names = {}, {};
	for k, v in pairs(roles) do
		if type(k) == "number" then
			list[k] = v;
		elseif v and type(k) == "string" then
			table.insert(set_names, k);
		end
	end
	table.sort(set_names);
	for _, name in ipairs(set_names) do table.insert(list, name); end
	return list;
end

local function import_roles(username, roles)
	local list = role_names(roles);
	if usermanager.set_user_role then
		if not list[1] then return; end
		local ok, err = usermanager.set_user_role(username, module.host, list[1]);
		if not ok then
			module:log("error", "Could not set role %s for new user %s: %s", list[1], username, err);
		end
		for i = 2, #list do
			local added, add_err = usermanager.add_user_secondary_role(username, module.host, list[i]);
			if not added then
				module:log("warn", "Could not add secondary role %s for new user %s: %s", list[i], username, add_err);
			end
		end
	else
		local set = {};
		for _, name in ipairs(list) do set[name] = true; end
		local ok, err = module:open_store("roles"):set(username, set);
		if not ok then
			module:log("error", "Could not store roles of new user %s: %s", username, err);
		end
	end
end

local require_encryption = module:get_option_boolean("c2s_require_encryption",
	module:get_option_boolean("require_encryption", true));
local invite_only = module:get_option_boolean("registration_invite_only", true);

local invites, throttle;
if prosody.process_type == "prosody" then
	invites = module:depends("invites");
	-- Guessing limits per address (invite_throttle_max, invite_throttle_period), one per
	-- host, shared with the web pages that check tokens (see mod_invites).
	throttle = invites.guess_throttle;

	if invite_only then
		module:depends("register_ibr");
	end
end

local xmlns_pars = "urn:xmpp:pars:0";

-- Every refusal, once, as Prosody's mod_register_limits keeps its errors: error name (from
-- mod_invites) → stanza error, with the `reason` label it counts under in the rejected
-- metric in `extra.metric`.
local refusals = errors.init(module.name, {
	["no-token"] = { type = "modify", condition = "bad-request",
		text = "The invitation token is missing", extra = { metric = "invalid" } };
	["token-invalid"] = { type = "cancel", condition = "item-not-found",
		text = "This invitation is not valid", extra = { metric = "invalid" } };
	["token-expired"] = { type = "cancel", condition = "item-not-found",
		text = "This invitation has expired", extra = { metric = "expired" } };
	["token-used"] = { type = "cancel", condition = "item-not-found",
		text = "This invitation has already been used", extra = { metric = "used" } };
	["token-revoked"] = { type = "cancel", condition = "item-not-found",
		text = "This invitation has been revoked", extra = { metric = "revoked" } };
	["username-mismatch"] = { type = "modify", condition = "not-acceptable",
		text = "This invitation is for another username", extra = { metric = "username-mismatch" } };
	["username-reserved"] = { type = "cancel", condition = "conflict",
		text = "This username is reserved for an invited user", extra = { metric = "username-reserved" } };
	["username-taken"] = { type = "cancel", condition = "conflict",
		text = "The requested username already exists.", extra = { metric = "username-taken" } };
	["account-not-found"] = { type = "modify", condition = "not-acceptable",
		text = "This invitation only resets the password of an existing account", extra = { metric = "account-not-found" } };
	["internal-server-error"] = { type = "wait", condition = "internal-server-error",
		text = "The invitation could not be checked, please try again later", extra = { metric = "internal-server-error" } };
	["invite-only"] = { type = "modify", condition = "not-acceptable",
		text = "Registration on this server is through invitation only", extra = { metric = "invite-only" } };
	["preauth-not-set"] = { type = "modify", condition = "bad-request",
		text = "A preauth request must be an iq of type 'set'", extra = { metric = "preauth-not-set" } };
	["wrong-host"] = { type = "cancel", condition = "not-allowed",
		text = "This invitation is for another host", extra = { metric = "wrong-host" } };
	["throttled"] = { type = "wait", condition = "policy-violation",
		text = "Too many invalid invitations from your address, please try again later", extra = { metric = "throttled" } };
});

-- Metrics (shown at /metrics with mod_http_openmetrics).
local redeemed_metric = module:metric("counter", "redeemed", "", "Invites redeemed", { "type" });
local rejected_metric = module:metric("counter", "rejected", "", "Invites refused", { "reason" });
-- A name outside the registry (from another module's invite-rejected) counts as itself.
local function count_rejection(name)
	local entry = refusals.registry[name];
	rejected_metric:with_labels(entry and entry.extra.metric or name):add(1);
end
local function count_redemption(invite)
	redeemed_metric:with_labels(invite.reset and "reset" or invite.type):add(1);
end
-- Refusals of mod_invites itself (the web pages that check tokens).
module:hook("invite-rejected", function (event)
	count_rejection(event.reason);
end);

-- A util.error for the refusal `name`; a name outside the registry is a server error.
local function refusal(name, context)
	if not refusals.registry[name] then name = "internal-server-error"; end
	return refusals.new(name, context);
end

local function error_reply(stanza, name)
	return st.error_reply(stanza, refusal(name));
end

-- Refuse a registration in user-registering, in both the util.error and the older style.
local function refuse_registration(event, name, text)
	local err = refusal(name, event);
	if text then err.text = text; end
	event.allowed = false;
	event.error = err;
	-- COMPAT pre-util.error: the older fields (mod_invites_register_web reads them)
	event.reason, event.error_type, event.error_condition = err.text, err.type, err.condition;
end

local legacy_invite_stream_feature = st.stanza("register", { xmlns = "urn:xmpp:invite" }):up();
local invite_stream_feature = st.stanza("register", { xmlns = "urn:xmpp:ibr-token:0" }):up();
module:hook("stream-features", function(event)
	local session, features = event.origin, event.features;

	-- Advertise to unauthenticated clients only, and only where registration may happen.
	if session.type ~= "c2s_unauthed" or (require_encryption and not session.secure) then
		return;
	end

	features:add_child(legacy_invite_stream_feature);
	features:add_child(invite_stream_feature);
end);

-- Client is submitting a preauth token to allow registration (XEP-0445)
module:hook("stanza/iq/"..xmlns_pars..":preauth", function(event)
	local origin, stanza = event.origin, event.stanza;
	local iq_type = stanza.attr.type;
	if iq_type == "result" or iq_type == "error" then
		return true; -- never answer an answer
	elseif iq_type ~= "set" then
		origin.send(error_reply(stanza, "preauth-not-set"));
		return true;
	end

	local ip, now = origin.ip or "unknown", os.time();
	if not throttle:allows(ip, now) then
		origin.log("debug", "Preauth refused: too many failed attempts from %s", ip);
		count_rejection("throttled");
		origin.send(error_reply(stanza, "throttled"));
		return true;
	end

	local token = stanza.tags[1].attr.token;
	local validated_invite, err;
	if not token or token == "" then
		err = "no-token";
	else
		-- For the stream's host: Prosody hands us a preauth addressed to this host on a
		-- stream opened to another, whose registration must not use our invite.
		validated_invite, err = invites.get(token, nil, origin.host or "");
	end
	if err == "wrong-host" then
		-- Refused before any lookup: not a guess, and nothing is left on the session.
		origin.log("info", "Preauth for %s refused on a stream to %s", module.host, tostring(origin.host));
		count_rejection(err);
		local wrong_host = refusal(err);
		wrong_host.text = ("Invitations for %s can only be used on a connection to %s"):format(module.host, module.host);
		origin.send(st.error_reply(stanza, wrong_host));
		return true;
	elseif not validated_invite then
		origin.log("debug", "Preauth refused: %s", err);
		if err ~= "internal-server-error" then -- a storage fault is not a guess
			throttle:failed(ip, now);
		end
		count_rejection(err);
		origin.send(error_reply(stanza, err));
		return true;
	end
	origin.log("debug", "Preauth accepted for invite %s", validated_invite.id);
	origin.validated_invite = validated_invite;
	origin.send(st.reply(stanza));
	return true;
end);

-- Registration attempt - ensure a valid preauth token has been supplied, and hold one
-- use of it. Runs after other user-registering handlers, so a registration another module
-- refuses never holds a use.
module:hook("user-registering", function (event)
	if event.allowed == false then return; end
	local validated_invite = event.validated_invite or (event.session and event.session.validated_invite);
	local username = event.username;

	if not validated_invite then
		if invite_only then
			refuse_registration(event, "invite-only");
			return;
		end
		-- Open registration, but names promised to invitees stay theirs.
		local reserved, err = invites.is_username_reserved(username);
		if reserved == nil then
			refuse_registration(event, err);
		elseif reserved then
			refuse_registration(event, "username-reserved");
		end
		return;
	end

	local ok, err = validated_invite:reserve(username, module.host);
	if not ok then
		local level = err == "wrong-host" and "info" or "debug";
		module:log(level, "Registration of %s with invite %s refused: %s", username, validated_invite.id, err);
		count_rejection(err);
		local text;
		if err == "username-mismatch" and validated_invite.reset then
			text = ("This invitation only resets the password of '%s'"):format(validated_invite.reset);
		elseif err == "username-mismatch" and validated_invite.bound_username then
			text = ("This invitation is for the username '%s' only"):format(validated_invite.bound_username);
		end
		refuse_registration(event, err, text);
		return;
	end
	if validated_invite.reset then
		event.allow_reset = validated_invite.reset;
	end
end, -10);

-- A registration that failed after user-registering (storage error, lost race for the
-- username) gives back the use it held, at once.
module:wrap_event("stanza/iq/jabber:iq:register:query", function (handlers, event_name, event_data)
	local ret = handlers(event_name, event_data);
	local validated_invite = event_data.origin and event_data.origin.validated_invite;
	if validated_invite then
		local ok, err = validated_invite:release();
		if ok == nil then
			module:log("warn", "Could not give back the use held by invite %s: %s", validated_invite.id, err);
		end
	end
	return ret;
end);

-- Make a *one-way* subscription: user sees when contact is online.
local function subscribe(host, user_username, contact_username)
	local user_jid = user_username.."@"..host;
	local contact_jid = contact_username.."@"..host;
	rostermanager.set_contact_pending_out(user_username, host, contact_jid);
	rostermanager.set_contact_pending_in(contact_username, host, user_jid);
	rostermanager.subscribed(contact_username, host, user_jid);
	rostermanager.process_inbound_subscription_approval(user_username, host, contact_jid);
end

local function import_groups(username, groups)
	if modulemanager.is_loaded(module.host, "invites_groups") then
		return; -- mod_invites_groups adds them (as Prosody 13's own mod_invites defers to it)
	end
	local mod_groups = modulemanager.get_module(module.host, "groups_internal");
	if not mod_groups then
		module:log("warn", "Invite for %s names groups, but mod_groups_internal is not loaded", username);
		return;
	end
	for _, group_id in ipairs(groups) do
		mod_groups.add_member(group_id, username);
	end
end

-- Registration successful: spend the use, then apply what the invite grants.
module:hook("user-registered", function (event)
	local validated_invite = event.validated_invite or (event.session and event.session.validated_invite);
	if not validated_invite then
		return;
	end
	local contact_username = event.username;
	local ok, err = validated_invite:confirm(contact_username, module.host);
	if err == "wrong-host" then
		-- Another host's invite grants nothing here (user-registering refuses it; this is
		-- for registrations that did not ask).
		module:log("warn", "Account %s was registered with invite %s of another host; it grants nothing here",
			contact_username, validated_invite.id);
		return;
	elseif ok then
		count_redemption(validated_invite);
	else
		module:log("warn", "Account %s was created, but its invite %s could not be marked used: %s",
			contact_username, validated_invite.id, err);
	end

	local inviter_username = validated_invite.type == "roster" and validated_invite.inviter;
	-- An account invite made with XEP-0401's roster-subscription (mod_invites_adhoc): the
	-- new account and the invite's creator become contacts too.
	local additional_data = validated_invite.additional_data;
	if not inviter_username and type(additional_data) == "table" and additional_data.roster_subscription == true then
		inviter_username = validated_invite.creator;
	end
	if inviter_username then
		module:log("debug", "Creating mutual subscription between %s and %s", inviter_username, contact_username);
		subscribe(module.host, inviter_username, contact_username);
		subscribe(module.host, contact_username, inviter_username);
		rostermanager.roster_push(inviter_username, module.host, contact_username.."@"..module.host);
	end

	if type(additional_data) == "table" then
		if type(additional_data.roles) == "table" and next(additional_data.roles) then
			module:log("debug", "Importing roles from invite");
			import_roles(contact_username, additional_data.roles);
		end
		if type(additional_data.groups) == "table" and additional_data.groups[1] then
			import_groups(contact_username, additional_data.groups);
		end
	end
end);

-- Equivalent of user-registered but for when the account already existed
-- (i.e. password reset)
module:hook("user-password-reset", function (event)
	local validated_invite = event.validated_invite or (event.session and event.session.validated_invite);
	if not validated_invite then
		return;
	end
	local ok, err = validated_invite:confirm(event.username, module.host);
	if ok then
		count_redemption(validated_invite);
	else
		module:log("warn", "Password of %s was reset, but invite %s could not be marked used: %s",
			event.username, validated_invite.id, err);
	end
end);

-- Send the inviter's current presence to a contact just approved (as mod_presence would).
local function send_presence_of_available_resources(username, host, contact)
	local user = prosody.bare_sessions[username.."@"..host];
	if not user then return; end
	for _, session in pairs(user.sessions) do
		if session.presence then
			local pres = st.clone(session.presence);
			pres.attr.to = contact;
			pres.attr.from = session.full_jid;
			module:send(pres);
		end
	end
end

-- XEP-0379: Pre-Authenticated Roster Subscription. A subscribe addressed to a full JID is
-- a subscription to the bare JID too (mod_presence), so it is handled, and its token
-- removed before the roster keeps the stanza, in both places.
local function preauth_subscription(event)
	local stanza = event.stanza;
	if stanza.attr.type ~= "subscribe" then return; end

	local preauth = stanza:get_child("preauth", xmlns_pars);
	if not preauth then return; end
	local token = preauth.attr.token;
	-- The roster keeps pending subscription requests as stanzas: the token must not be in it.
	stanza:remove_children("preauth", xmlns_pars);
	if not token then return; end

	local username, host = jid_split(stanza.attr.to);
	local contact = jid_bare(stanza.attr.from);
	if not username or not contact then return; end

	if rostermanager.is_contact_subscribed(username, host, contact) then
		-- Already approved: mod_presence confirms it again; any invite stays for its contact.
		module:log("debug", "Subscription request with an invite: %s is already subscribed to %s", contact, username);
		return;
	end

	-- Auto-approval tells the sender the token was good, so guesses count here as in preauth:
	-- per address for a local client, per sending domain for another server (whose address
	-- all its users share). Only unknown tokens count: a contact re-sending an old link is
	-- not guessing. A refusal is not an error for the sender: the user approves or not.
	local origin, now = event.origin, os.time();
	local guesser = origin and origin.type == "c2s" and origin.ip
		or "xmpp:"..(select(2, jid_split(contact)) or "unknown");
	if not throttle:allows(guesser, now) then
		count_rejection("throttled");
		module:log("debug", "Subscription request to %s with an invite: too many failed attempts from its sender", username);
		return;
	end
	local invite, err = invites.get(token, username, host);
	if not invite then
		if err == "token-invalid" then
			throttle:failed(guesser, now);
		end
		count_rejection(err);
		module:log("debug", "Subscription request to %s with an invalid invite (%s), leaving it to the user", username, err);
		return;
	end
	local used, use_err = invite:use(contact.." (subscription to "..username..")", host);
	if not used then
		count_rejection(use_err);
		module:log("debug", "Subscription invite %s not usable: %s", invite.id, use_err);
		return;
	end

	count_redemption(invite);
	if not (rostermanager.set_contact_pending_in(username, host, contact)
		and rostermanager.subscribed(username, host, contact)) then
		module:log("error", "Could not approve the subscription of %s to %s (invite %s spent)", contact, username, invite.id);
		return;
	end
	rostermanager.roster_push(username, host, contact);

	-- Approve to the sender whether or not the inviter is online.
	local user_jid = username.."@"..host;
	module:send(st.presence({ type = "subscribed", from = user_jid, to = contact }));
	send_presence_of_available_resources(username, host, contact);

	-- Send back a subscription request (goal is mutual subscription)
	if not rostermanager.is_user_subscribed(username, host, contact)
	and not rostermanager.is_contact_pending_out(username, host, contact) then
		module:log("debug", "Sending automatic subscription request to %s from %s", contact, username);
		if rostermanager.set_contact_pending_out(username, host, contact) then
			rostermanager.roster_push(username, host, contact);
			module:send(st.presence({ type = "subscribe", from = user_jid, to = contact }));
		else
			module:log("warn", "Failed to set contact pending out for %s", username);
		end
	end
	return true;
end
module:hook("presence/bare", preauth_subscription, 1);
module:hook("presence/full", preauth_subscription, 1);
