-- mod_invites: the invite store other modules call (`module:depends("invites")`).
--
-- A drop-in for Prosody's own mod_invites with the same Lua API, backed by the
-- prosody_invites Rust core, which owns tokens, hashing, the storage layout and the
-- invite state machine. This file reads options, hands the core Prosody stores, fires
-- events and formats what the core returns. Tokens are never stored or logged: storage
-- is keyed by their SHA-256, and logs name invites by a short id.

local id = require "util.id";
local jid_split = require "util.jid".split;
local nodeprep = require "util.encodings".stringprep.nodeprep;
local usermanager = require "core.usermanager";

-- COMPAT: Prosody 13 has a role API (invites carry roles as a list, primary role first)
-- and admin shell commands as "shell-command" items; 0.12 keeps role sets in the "roles"
-- store and shell commands in a shared console environment.
local has_role_api = usermanager.set_user_role ~= nil;
local has_shell_items = has_role_api;
-- Prosody 13's mod_invites makes landing pages from the `invites_page` option itself;
-- 0.12's leaves that to mod_invites_page (which reads the same option).
local makes_landing_pages = has_role_api;

-- Roles for a new invite, from a list of names (primary first): 13 keeps the list, 0.12
-- takes a set and gives an account one role, so the last name counts there.
local function roles_for_invite(names)
	if has_role_api then return names; end
	return { [names[#names]] = true };
end

-- Where admin shell commands live (`commands`: see "Admin shell commands" below).
-- Prosody 13: "shell-command" items, each run on the module instance of the host its first
-- argument names (`prosodyctl shell invite list example.com`). Prosody 0.12: one console
-- environment shared by all hosts (`invite:list("example.com")`), where each command finds
-- the host's module instance itself. (On 13, writing there would replace 13's section.)
local function offer_shell_commands(commands)
	if has_shell_items then
		for _, command in ipairs(commands) do
			module:add_item("shell-command", {
				section = "invite";
				section_desc = "Create and manage invitations";
				name = command.name;
				desc = command.desc;
				args = command.args;
				host_selector = command.args[1].name;
				flags = command.flags;
				handler = function (self, ...)
					return command.run(self.session.print, ...);
				end;
			});
		end
		return;
	end
	local get_module = require "core.modulemanager".get_module;
	local console_env = module:shared("/*/admin_shell/env");
	console_env.invite = {};
	for _, command in ipairs(commands) do
		local name, console = command.name, command.console;
		console_env.invite[name] = function (self, first, ...)
			local host = type(first) == "string" and select(2, jid_split(first));
			if not host then
				return nil, "Please give the host (or a JID) as the first argument";
			end
			local mod_invites = get_module(host, "invites");
			if not mod_invites then
				return nil, "mod_invites is not loaded on "..host;
			end
			local run = mod_invites.admin_command[name].run;
			if console then
				return run(self.session.print, console(first, ...));
			end
			return run(self.session.print, first, ...);
		end;
	end
end

-- Prosody does not add plugin folders to package.cpath: load the core from beside this file.
local core_path = module:get_directory().."/prosody_invites.so";
local open_core, load_err = package.loadlib(core_path, "luaopen_prosody_invites");
if not open_core then
	error("Could not load the invite core from "..core_path..": "..tostring(load_err));
end
local core = open_core();

local pack = table.pack or function (...) return { n = select("#", ...), ... }; end;
local unpack = table.unpack or unpack; -- luacheck: ignore 113

-- The core raises its errors as mlua values, which a Lua caller can neither print nor
-- concatenate (mod_admin_shell fails on them): every call into the book goes through this
-- proxy, which raises the first line of the message as a string instead.
local function text_error(err)
	return (tostring(err):match("^[^\n]*"):gsub("^runtime error: ", ""));
end
local function with_text_errors(object)
	return setmetatable({}, { __index = function (proxy, name)
		local method = object[name];
		if type(method) ~= "function" then return method; end
		local function call(_, ...)
			local result = pack(pcall(method, object, ...));
			if not result[1] then
				error(text_error(result[2]), 2);
			end
			return unpack(result, 2, result.n);
		end
		rawset(proxy, name, call);
		return call;
	end });
end

-- Seconds, or a period such as "1 week" or "3d" (Prosody 13 style) on every version, of at
-- least `min` seconds. With `can_be_off`, zero (0, "0s", …), false or "never" mean off
-- (returns nil). A value that is none of these is logged and the default used.
local function period_option(name, default, min, can_be_off)
	local value = module:get_option(name, default);
	local seconds, err;
	if value == false or value == "never" then
		err = "false and \"never\" are not periods here";
	elseif type(value) == "number" then
		if value >= 0 and value < 2^53 then
			seconds = math.floor(value);
		else
			err = "not a number of seconds";
		end
	elseif type(value) == "string" and value:match("^%s*0+%s*%a*%s*$") then
		seconds = 0; -- "0s", "0 days": the parser refuses zero, which means "at once" or "off" here
	else
		seconds, err = core.parse_duration(tostring(value));
	end
	if can_be_off and (seconds == 0 or value == false or value == "never") then
		return nil;
	elseif seconds and seconds < min then
		seconds, err = nil, ("less than %d seconds"):format(min);
	end
	if not seconds then
		module:log("error", "Option %s = %q is not a usable period (%s); using %d seconds", name, tostring(value),
			err, default);
		return default;
	end
	return seconds;
end

-- Options, read once at load and again when prosodyctl points this (global) instance at a
-- host: the module is then already loaded globally and cannot be loaded for the host.
local default_ttl, retention, prune_interval, reservation_lease, token_storage, key_file;
local function read_options()
	default_ttl = period_option("invite_expiry", 86400 * 7, 1);

	-- Finished (used, revoked, expired) invites are kept this long, then pruned.
	retention = period_option("invite_retention", 7 * 86400, 0);
	prune_interval = period_option("invite_prune_interval", 3600, 1, true);

	-- How long a registration may take between user-registering and user-registered before
	-- the use it holds is given back (it is given back at once when registration fails).
	-- Only a server that died mid-registration leaves a reservation to lapse.
	reservation_lease = period_option("invite_reservation_lease", 120, 1);

	-- Tokens at rest: "sealed" (default) keeps each token encrypted with the key in
	-- invite_token_key_file, so listings can show links again; "hash" keeps nothing usable.
	token_storage = module:get_option_string("invite_token_storage", "sealed");
	if token_storage ~= "sealed" and token_storage ~= "hash" then
		module:log("error", "Option invite_token_storage = %q is neither \"sealed\" nor \"hash\"; using \"sealed\"",
			token_storage);
		token_storage = "sealed";
	end
	-- Outside the invite store: a copy of the store (a database dump) without this file
	-- holds no usable token. One key for every host of the server.
	key_file = module:get_option_path("invite_token_key_file", "invite_token.key", "data");
end
read_options();

local book;
local invite_store;

local function log_from_core(level, message)
	module:log(level, "%s", message);
end

local function open_book()
	invite_store = module:open_store("invites");
	book = with_text_errors(core.new({
		host = module.host;
		token_storage = token_storage;
		key_file = key_file;
		invites = invite_store;
		names = module:open_store("invites_by_username");
		log = log_from_core;
		-- Settles registrations a crash cut short (see src/state.rs, settle_lapsed).
		account_exists = function (username)
			return usermanager.user_exists(username, module.host);
		end;
	}));
end

-- Opened on first use: in prosodyctl the host's storage exists only once a command set it up.
local function get_book()
	if not book then
		open_book();
	end
	return book;
end

-- Validated invites: what `get` returns, with `:use()` and the registration steps.
local valid_invite_methods = {};
local valid_invite_mt = { __index = valid_invite_methods };

-- Per validated invite (weak keys, so nothing outlives the session holding it):
local validated_at = setmetatable({}, { __mode = "k" }); -- when it was checked
local contact_of = setmetatable({}, { __mode = "k" }); -- inviter, for XEP-0379 use
local holders = setmetatable({}, { __mode = "k" }); -- reservation of a registration in flight
local new_account_of = setmetatable({}, { __mode = "k" }); -- the name it is for, if not taken then
local spent = setmetatable({}, { __mode = "k" }); -- already registered an account

-- Metrics exist in the server only; prosodyctl has no statistics to report them to.
local created_metric = { with_labels = function () return { add = function () end }; end };
if prosody.process_type == "prosody" then
	created_metric = module:metric("counter", "created", "", "Invites created", { "type" });
end

--- Guessing limits
-- One throttle per host for every path that checks a token: c2s preauth and XEP-0379
-- (mod_invites_register) and the web pages of the invite suite (below). The
-- invite_throttle_max-th failed attempt from one address (IPv6: one /64) within
-- invite_throttle_period seconds refuses every attempt from there for one period.

-- A whole number option of at least `min`; anything else is logged and the default used.
local function count_option(name, default, min)
	local value = module:get_option(name, default);
	if type(value) ~= "number" or value < min or value ~= math.floor(value) or value > 2^31 then
		module:log("error", "Option %s = %s is not a whole number of at least %d; using %d",
			name, tostring(value), min, default);
		return default;
	end
	return value;
end

local throttle_max = count_option("invite_throttle_max", 10, 0);
local throttle_period = count_option("invite_throttle_period", 60, 1);
-- Addresses tracked at once; beyond that the oldest windows are forgotten (bounded memory).
local throttle_capacity = 10000;

-- Shared with mod_invites_register: allows(address, now), failed(address, now),
-- retry_after(address, now) (see src/throttle.rs). invite_throttle_max = 0 turns it off.
if throttle_max > 0 then
	guess_throttle = core.throttle(throttle_max, throttle_period, throttle_capacity); --luacheck: ignore 111/guess_throttle
else
	if prosody.process_type == "prosody" then
		module:log("warn", "invite_throttle_max = 0: guessing invite tokens is not limited");
	end
	guess_throttle = { --luacheck: ignore 111/guess_throttle
		allows = function () return true; end;
		failed = function () end;
		retry_after = function () return nil; end;
	};
end

-- As Prosody: invite-created fires before the invite is stored, and what its handlers
-- change in additional_data and landing_page is stored with it.
local function fire_invite_created(invite)
	module:fire_event("invite-created", invite);
end

local function create_invite(spec)
	if spec.ttl ~= nil and (type(spec.ttl) ~= "number" or spec.ttl ~= math.floor(spec.ttl)) then
		error("bad argument 'ttl' (whole number of seconds expected, got "..type(spec.ttl)..")", 3);
	end
	spec.ttl = spec.ttl or default_ttl;
	local invite, err = get_book():create(spec, os.time(), fire_invite_created);
	if not invite then
		return nil, err; -- the core has logged what failed
	end
	created_metric:with_labels(spec.reset and "reset" or spec.type):add(1);
	return invite;
end

-- Landing pages without mod_invites_page, as Prosody 13's mod_invites makes them (on 13
-- only, see COMPAT above): with `invites_page` set to a URL template (e.g. a deployment of
-- easy-xmpp-invitation), invites of the types in `invites_page_supports` get
-- `landing_page`. Runs after other handlers of invite-created, so mod_invites_page keeps
-- its own.
local url_escape = require "util.http".urlencode;
local render_url = require "util.interpolation".new("%b{}", url_escape, {
	urlescape = url_escape;
	noscheme = function (url)
		return (url:gsub("^[^:]+:", ""));
	end;
});
local invite_url_template = makes_landing_pages and module:get_option_string("invites_page");
local invites_page_supports = module:get_option_set("invites_page_supports", { "account", "contact", "account-and-contact" });

module:hook("invite-created", function (invite)
	if not invite_url_template or invite.landing_page then return; end
	local invite_type;
	if invite.reset then
		invite_type = "password-reset"; -- as Prosody 13.0.2 and later
	elseif invite.type == "register" then
		invite_type = "account";
	elseif invite.type == "roster" then
		invite_type = invite.allow_registration and "account-and-contact" or "contact-only";
	end
	if invites_page_supports:contains(invite_type) then
		invite.landing_page = render_url(invite_url_template, { host = module.host, invite = invite });
	end
end, -1);

-- Create invitation to register an account (optionally restricted to the specified username).
-- Extension: `max_uses` lets that many different accounts register with one invite.
-- The username is normalised as registration will normalise it ("Alice" binds "alice").
function create_account(account_username, additional_data, ttl, max_uses) --luacheck: ignore 131/create_account
	if account_username ~= nil then
		account_username = type(account_username) == "string" and nodeprep(account_username) or nil;
		if not account_username or account_username == "" then
			return nil, "username-invalid";
		end
	end
	local reset = type(additional_data) == "table" and additional_data.allow_reset or nil;
	if reset then
		reset = type(reset) == "string" and nodeprep(reset) or nil;
		if not reset or reset == "" then
			return nil, "username-invalid";
		end
	end
	return create_invite({
		type = "register";
		jid = account_username and (account_username.."@"..module.host) or module.host;
		allow_registration = true;
		additional_data = additional_data;
		ttl = ttl;
		max_uses = max_uses;
		username = account_username;
		reset = reset;
	});
end

-- Create invitation to reset the password for an account
function create_account_reset(account_username, ttl) --luacheck: ignore 131/create_account_reset
	return create_account(account_username, { allow_reset = account_username }, ttl or 86400);
end

-- Create invitation to become a contact of a local user
function create_contact(username, allow_registration, additional_data, ttl) --luacheck: ignore 131/create_contact
	username = type(username) == "string" and nodeprep(username) or nil;
	if not username or username == "" then
		return nil, "username-invalid";
	end
	return create_invite({
		type = "roster";
		jid = username.."@"..module.host;
		allow_registration = not not allow_registration;
		additional_data = additional_data;
		ttl = ttl;
		inviter = username;
	});
end

-- Create invitation to register an account and join a user group.
-- With an explicit ttl the invite is valid for any number of sign-ups until it expires.
function create_group(group_ids, additional_data, ttl) --luacheck: ignore 131/create_group
	local merged_additional_data = { groups = group_ids };
	if additional_data then
		for k, v in pairs(additional_data) do
			merged_additional_data[k] = v;
		end
	end
	return create_invite({
		type = "register";
		jid = module.host;
		allow_registration = true;
		additional_data = merged_additional_data;
		ttl = ttl;
		reusable = not not ttl;
	});
end

-- A listed invite's handle where its token cannot be had (hash storage, another key): the
-- SHA-256 of the token, which is also its storage key. Not a secret, and never a token:
-- only the admin functions below take it.
local function is_handle(ref)
	return type(ref) == "string" and #ref == 64 and ref:match("^[0-9a-f]+$") ~= nil;
end

-- Iterates pending (unexpired, unused, not revoked) invites that allow registration.
-- Yields token, invite as Prosody does, with the token, uri and landing_page where the
-- token was sealed; otherwise `token` is the invite's handle and there is no link.
function pending_account_invites() --luacheck: ignore 131/pending_account_invites
	local now = os.time();
	local invites = get_book();
	local next_owner, state, owner = invite_store:users();
	return function()
		while true do
			owner = next_owner(state, owner);
			if owner == nil then return nil; end
			local invite = invites:listed(owner, now);
			if invite and invite.allow_registration
			and (invite.status == "pending" or invite.status == "reserved") then
				return invite.token, invite;
			end
		end
	end;
end

-- A valid invite by token, or by handle (see pending_account_invites).
function get_account_invite_info(token) --luacheck: ignore 131/get_account_invite_info
	local now = os.time();
	local invite, err = get_book():get(token, nil, module.host, now);
	if not invite and err == "token-invalid" and is_handle(token) then
		local listed = get_book():listed(token, now);
		if listed and (listed.status == "pending" or listed.status == "reserved") then
			return listed;
		end
	end
	return invite, err;
end

-- Revokes an invite, by token or handle; takes effect at once, also for sessions that
-- already sent preauth. As Prosody's, true also when there is nothing left to revoke.
function delete_account_invite(token) --luacheck: ignore 131/delete_account_invite
	local now = os.time();
	local invite, err = get_book():revoke(token, now);
	if not invite and err == "token-invalid" and is_handle(token) then
		invite, err = get_book():revoke_key(token, now);
	end
	if not invite then
		if err == "token-invalid" then
			return true; -- gone already (or never was)
		end
		return nil, err;
	end
	module:log("info", "Invite %s revoked", invite.id);
	return true;
end

-- Web requests being served by a guarded route (see "Guessing over HTTP" below), by
-- the coroutine serving them: the client address a failed lookup counts against.
local http_client_of = setmetatable({}, { __mode = "k" });

-- Get a validated invite (or nil, err). Must call :use() on the returned invite after it
-- is actually successfully used. For "roster" invites used for a subscription, the
-- username of the local user who issued the invite must be passed.
-- Extension: `host`, the host the invite is to be used on (default this one): any other
-- gives nil, "wrong-host" (an invite belongs to the host it was made on).
function get(token, username, host)
	local now = os.time();
	local invite, err = get_book():get(token, username, host or module.host, now);
	if not invite then
		module:log("debug", "Invite lookup refused: %s", err);
		local client = http_client_of[coroutine.running()];
		if client and err ~= "internal-server-error" then -- a storage fault is not a guess
			guess_throttle:failed(client, now);
			module:fire_event("invite-rejected", { reason = err, ip = client, via = "http" });
		end
		return nil, err;
	end
	validated_at[invite] = now;
	contact_of[invite] = username;
	return setmetatable(invite, valid_invite_mt);
end

-- Spends one use at once (contact invites, other modules). Extensions: `by` names who
-- used it, for the log line; `host` is the host it is used on (default this one).
function valid_invite_methods:use(by, host)
	local used, err = get_book():use(self.token, contact_of[self], host or module.host, os.time());
	if not used then
		module:log("debug", "Invite %s not used: %s", self.id, err);
		return nil, err;
	end
	module:log("info", "Invite %s redeemed by %s", self.id, type(by) == "string" and by or "another module");
	return true;
end

-- Registration step 1 (user-registering): hold one use of the invite for the account
-- `username` on `host` (the host registering it; another host's invite is refused).
function valid_invite_methods:reserve(username, host)
	if spent[self] then
		return nil, "token-used";
	end
	local holder = holders[self] or id.short();
	local now = os.time();
	local account_exists = usermanager.user_exists(username, module.host);
	local reserved, err = get_book():reserve(self.token, {
		holder = holder;
		username = username;
		account_exists = account_exists;
		validated_at = validated_at[self] or now;
		lease_until = now + reservation_lease;
	}, host, now);
	if not reserved then
		return nil, err;
	end
	holders[self] = holder;
	new_account_of[self] = not account_exists and username or nil;
	return true;
end

-- Registration step 2 (user-registered / user-password-reset): spend the held use, for
-- the new or reset account `username` on `host`.
function valid_invite_methods:confirm(username, host)
	local holder = holders[self];
	local invite, err = get_book():confirm(self.token, holder or id.short(), host, os.time());
	if err == "wrong-host" then
		return nil, err; -- not this host's to spend: the reservation stays for its own
	end
	holders[self] = nil;
	spent[self] = true;
	if not invite then
		return nil, err;
	end
	module:log("info", "Invite %s redeemed by %s@%s (%d of %s uses)", invite.id, username, host, invite.uses,
		invite.max_uses or "unlimited");
	return true;
end

-- Registration failed between the two steps: give the held use back. Unless the account
-- exists after all: Prosody 13 creates it before setting its password and does not remove
-- it when that fails, so the use counts as spent.
function valid_invite_methods:release()
	local holder = holders[self];
	if not holder then
		return true;
	end
	local username = new_account_of[self];
	if username and usermanager.user_exists(username, module.host) then
		module:log("warn", "Registration of %s failed after its account was created; invite %s counts it", username, self.id);
		return self:confirm(username, module.host);
	end
	holders[self] = nil;
	return get_book():release(self.token, holder);
end

function use(token) --luacheck: ignore 131/use
	local invite, err = get(token);
	if not invite then
		return nil, err;
	end
	return invite:use();
end

-- Is this username held for a pending invite? (nil, err when storage fails)
function is_username_reserved(username) --luacheck: ignore 131/is_username_reserved
	return get_book():username_reserved(username, os.time());
end

--- Guessing over HTTP
-- The invite suite's web pages check tokens too: mod_invites_page (landing pages),
-- mod_invites_register_web (the registration form) and mod_invites_register_api. Their
-- routes are wrapped as they are provided (before mod_http registers them; these modules
-- depend on this one, so it is loaded first): a request from a locked address gets 429
-- before any lookup, and a lookup that fails while one of them serves a request counts
-- against the client's address, the same budget c2s preauth and XEP-0379 use. The address
-- is `request.ip` as mod_http reports it (it honours `trusted_proxies`).
local guarded_web_modules = {
	invites_page = "html";
	invites_register_web = "html";
	invites_register_api = "json";
};
local throttled_text = "Too many invalid invitations from your address, please try again later";
local throttled_page = [[<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Too many attempts</title></head>
<body><h1>Too many attempts</h1><p>]]..throttled_text..[[.</p></body></html>
]];

local function throttled_response(style, retry_after)
	local json = require "util.json";
	return {
		status_code = 429;
		headers = {
			content_type = style == "json" and "application/json" or "text/html; charset=utf-8";
			retry_after = tostring(retry_after or throttle_period);
		};
		body = style == "json" and json.encode({ error = "throttled", text = throttled_text }) or throttled_page;
	};
end

local guarded_routes = setmetatable({}, { __mode = "k" });

local function guard_route(handler, style)
	local function guarded(event, ...)
		local ip = event.request and event.request.ip or "unknown";
		local now = os.time();
		if not guess_throttle:allows(ip, now) then
			module:log("debug", "Web request refused: too many failed attempts from %s", ip);
			module:fire_event("invite-rejected", { reason = "throttled", ip = ip, via = "http" });
			return throttled_response(style, guess_throttle:retry_after(ip, now));
		end
		local thread = coroutine.running();
		local outer = http_client_of[thread];
		http_client_of[thread] = ip;
		local result = pack(pcall(handler, event, ...));
		http_client_of[thread] = outer;
		if not result[1] then
			error(result[2], 0);
		end
		return unpack(result, 2, result.n);
	end
	guarded_routes[guarded] = true;
	return guarded;
end

if prosody.process_type == "prosody" then
	-- Before mod_http (priority 0) turns the routes into handlers.
	module:hook("item-added/http-provider", function (event)
		local item = event.item;
		local style = guarded_web_modules[item._provided_by];
		if not style or type(item.route) ~= "table" then return; end
		for route, handler in pairs(item.route) do
			if type(handler) == "function" and not guarded_routes[handler] then
				item.route[route] = guard_route(handler, style);
			end
		end
	end, 10);
end

--- Migration from Prosody's own mod_invites
-- Its store "invite_token" keeps plaintext tokens: account invites in one host-wide
-- record (token → invite), contact invites per inviter (token → expiry). Pending ones are
-- imported under their hash, so links handed out before the switch keep working; every
-- entry that was imported (or had expired) is then removed.
local function migrate_legacy_invites()
	local legacy = module:open_store("invite_token");
	local now = os.time();
	local imported, failed = 0, 0;

	-- Returns false when the entry should stay for the next start (a storage failure);
	-- an entry that can never be imported (no usable token) is dropped, once, with a warning.
	local function import(token, invite, inviter)
		local ok, err = get_book():import_legacy(token, {
			type = invite.type;
			jid = invite.jid;
			allow_registration = not not invite.allow_registration;
			additional_data = type(invite.additional_data) == "table" and invite.additional_data or nil;
			created_at = math.floor(invite.created_at);
			expires = math.floor(invite.expires);
			reusable = not not invite.reusable;
			landing_page = type(invite.landing_page) == "string" and invite.landing_page or nil;
		}, inviter, now);
		if ok == nil and err == "internal-server-error" then
			failed = failed + 1;
			module:log("warn", "Could not import an invite of mod_invites: %s", err);
			return false;
		elseif ok == nil then
			module:log("warn", "Dropped an invite of mod_invites that cannot be used (%s)", err);
		elseif ok then
			imported = imported + 1;
		end
		return true;
	end

	local function valid_legacy(invite)
		return type(invite) == "table" and type(invite.jid) == "string"
			and (invite.type == "register" or invite.type == "roster")
			and type(invite.expires) == "number" and type(invite.created_at) == "number";
	end

	local host_invites = legacy:get(nil);
	if type(host_invites) == "table" then
		local remaining = {};
		for token, invite in pairs(host_invites) do
			if type(token) == "string" and valid_legacy(invite) then
				local inviter = invite.type == "roster" and jid_split(invite.jid) or nil;
				if not import(token, invite, inviter) then
					remaining[token] = invite;
				end
			end
		end
		legacy:set(nil, next(remaining) and remaining or nil);
	end

	for username in legacy:users() do
		if username and username ~= "" then
			local contact_invites = legacy:get(username);
			local remaining = {};
			for token, expires in pairs(contact_invites or {}) do
				if type(token) == "string" and type(expires) == "number" then
					local invite = {
						type = "roster";
						jid = username.."@"..module.host;
						allow_registration = false;
						created_at = now;
						expires = math.floor(expires);
					};
					if not import(token, invite, username) then
						remaining[token] = expires;
					end
				end
			end
			legacy:set(username, next(remaining) and remaining or nil);
		end
	end

	if imported > 0 or failed > 0 then
		module:log("info", "Imported %d pending invites from mod_invites (%d failed, kept for the next start)", imported, failed);
	end
end

if prosody.process_type == "prosody" then
	local ok, err = pcall(migrate_legacy_invites);
	if not ok then
		module:log("error", "Migration of mod_invites invites failed: %s", err);
	end
end

--- Housekeeping
-- Used, revoked and expired records are kept for `invite_retention` seconds (so
-- `list --all` can show them), then removed every `invite_prune_interval` seconds.

-- Prunes the stored invites under `keys` from `first` on, at most `batch` of them (all if
-- nil), removing finished ones older than `keep` seconds. Returns how many it removed, how
-- many failed (storage errors, logged by the core) and where to go on (nil when done).
local function prune_keys(keys, first, batch, keep, now)
	local invites = get_book();
	local removed, failed = 0, 0;
	local last = batch and math.min(#keys, first + batch - 1) or #keys;
	for i = first, last do
		local ok = invites:prune(keys[i], now, keep);
		if ok == nil then
			failed = failed + 1;
		elseif ok then
			removed = removed + 1;
		end
	end
	return removed, failed, last < #keys and last + 1 or nil;
end

-- The keys of all stored invites, or nil, err. Collected first: some stores cannot be
-- written while their listing is open.
local function all_keys()
	get_book(); -- opens invite_store
	local ok, keys = pcall(function ()
		local list = {};
		for key in invite_store:users() do
			table.insert(list, key);
		end
		return list;
	end);
	if not ok then
		module:log("error", "Could not list the stored invites: %s", keys);
		return nil, "the invite store failed (the error is logged)";
	end
	return keys;
end

-- Removes finished invites older than `keep` seconds at once (the prune command). Returns
-- how many, or nil, err if any could not be removed (the others are removed all the same).
function prune(keep) --luacheck: ignore 131/prune
	local keys, err = all_keys();
	if not keys then return nil, err; end
	local removed, failed = prune_keys(keys, 1, nil, keep or 0, os.time());
	if failed > 0 then
		return nil, ("%d removed, %d could not be read or removed (see the log)"):format(removed, failed);
	end
	return removed;
end

-- The timer prunes in batches, one per turn of the event loop, so a store with many
-- invites never holds up the server for long.
local prune_batch = 200;
local pruning = false; -- a run is under way (a short interval must not start a second)

local function prune_in_background()
	if pruning then return; end
	local keys, now = all_keys(), os.time();
	if not keys then return; end -- logged; the next interval tries again
	pruning = true;
	local removed, failed, next_key = 0, 0, 1;
	local function step()
		local ok, r, f, after = pcall(prune_keys, keys, next_key, prune_batch, retention, now);
		if not ok then -- an error, not a failure the core reports: end this run, keep the timer
			pruning = false;
			module:log("error", "Pruning finished invites stopped: %s", r);
			return nil;
		end
		removed, failed, next_key = removed + r, failed + f, after;
		if next_key then
			return 0; -- again, on the next turn of the loop
		end
		pruning = false;
		if failed > 0 then
			module:log("warn", "Pruned %d finished invites; %d could not be read or removed", removed, failed);
		elseif removed > 0 then
			module:log("info", "Pruned %d finished invites", removed);
		end
	end
	if step() then module:add_timer(0, step); end
end

if prosody.process_type == "prosody" and prune_interval then
	-- The first run a minute after start (sooner with a shorter interval), then every interval.
	module:add_timer(math.min(prune_interval, 60), function ()
		prune_in_background();
		return prune_interval;
	end);
end

--- Admin commands, shared by prosodyctl and the admin console

local function describe_target(invite)
	if invite.type == "roster" then
		return "contact of "..tostring(invite.inviter)..(invite.allow_registration and " (may register)" or "");
	elseif invite.reset then
		return "password reset of "..invite.reset;
	elseif invite.bound_username then
		return "account "..invite.bound_username;
	end
	return "new account";
end

local function uses_text(invite)
	if invite.max_uses == nil then
		return ("%d/unlimited"):format(invite.uses);
	end
	return ("%d/%d"):format(invite.uses, invite.max_uses);
end

local function when(t)
	return os.date("!%Y-%m-%d %H:%M", t);
end

-- One line per invite; `all` includes used, expired and revoked ones.
-- Streams the store (a listing never holds every record); nil, err if the store fails.
function list_lines(all) --luacheck: ignore 131/list_lines
	local invites, now = get_book(), os.time();
	local lines = { ("%-10s  %-8s  %-8s  %-16s  %-16s  %-11s  %s"):format(
		"ID", "TYPE", "STATUS", "CREATED (UTC)", "EXPIRES (UTC)", "USES", "FOR") };
	local ok, err = pcall(function ()
		for key in invite_store:users() do
			local invite = invites:listed(key, now);
			if invite and (all or invite.status == "pending" or invite.status == "reserved") then
				table.insert(lines, ("%-10s  %-8s  %-8s  %-16s  %-16s  %-11s  %s"):format(
					invite.id, invite.type, invite.status, when(invite.created_at), when(invite.expires),
					uses_text(invite), describe_target(invite)));
			end
		end
	end);
	if not ok then
		module:log("error", "Could not list the stored invites: %s", err);
		return nil, "Could not list: the invite store failed (the error is logged)";
	end
	return lines;
end

-- Finds the storage key for an id (or a unique end of one) or a token.
local function resolve(ref)
	if type(ref) ~= "string" or ref == "" then
		return nil, "Please give an invite id (from 'list') or a token";
	end
	get_book(); -- opens invite_store
	local key = core.key_of(ref);
	if key and invite_store:get(key) ~= nil then
		return key;
	end
	ref = ref:lower();
	if #ref >= 4 and ref:match("^%x+$") then
		local found;
		for owner in invite_store:users() do
			if owner:sub(-#ref) == ref then
				if found then
					return nil, "More than one invite matches that id; give more of it";
				end
				found = owner;
			end
		end
		if found then return found; end
	end
	return nil, "No such invite";
end

function show_lines(ref) --luacheck: ignore 131/show_lines
	local key, err = resolve(ref);
	if not key then return nil, err; end
	local invite = get_book():listed(key, os.time());
	if not invite then return nil, "The invite record is unreadable (see the log)"; end
	local lines = {
		"id:          "..invite.id;
		"type:        "..invite.type;
		"status:      "..invite.status;
		"for:         "..describe_target(invite);
		"created:     "..when(invite.created_at).." UTC";
		"expires:     "..when(invite.expires).." UTC";
		"uses:        "..uses_text(invite);
	};
	-- The one place a link is shown again: an admin asking for this invite.
	if invite.uri then
		table.insert(lines, "link:        "..invite.uri);
	end
	if invite.landing_page then
		table.insert(lines, "page:        "..invite.landing_page);
	end
	local data = invite.additional_data;
	if type(data) == "table" then
		local roles = {};
		for k, v in pairs(type(data.roles) == "table" and data.roles or {}) do
			table.insert(roles, type(k) == "number" and tostring(v) or tostring(k));
		end
		if roles[1] then table.insert(lines, "roles:       "..table.concat(roles, ", ")); end
		if type(data.groups) == "table" and data.groups[1] then
			table.insert(lines, "groups:      "..table.concat(data.groups, ", "));
		end
	end
	return lines;
end

-- Error names as an admin reads them at the command line.
local function for_admin(err)
	if err == "internal-server-error" then
		return "the invite store failed (the error is logged)";
	end
	return tostring(err);
end

function revoke_by_ref(ref) --luacheck: ignore 131/revoke_by_ref
	local key, err = resolve(ref);
	if not key then return nil, err; end
	local now = os.time();
	local current = get_book():listed(key, now);
	if current and current.status ~= "pending" and current.status ~= "reserved" then
		return nil, ("Invite %s is already %s; nothing to revoke"):format(current.id, current.status);
	end
	local invite, revoke_err = get_book():revoke_key(key, now);
	if not invite then return nil, "Could not revoke: "..for_admin(revoke_err); end
	return invite;
end

function create_for_command(options, username) --luacheck: ignore 131/create_for_command
	if options.reset then
		return create_account_reset(options.reset, options.ttl);
	end
	return create_account(username, {
		roles = options.roles;
		groups = options.groups[1] and options.groups or nil;
	}, options.ttl, options.uses);
end

-- Checks generate's options, whether from prosodyctl's argv or the admin shell:
-- { admin, role = {...}, group = {...}, expires_after, uses, reset }, for an invite bound
-- to `username` if given. Returns what create_for_command takes, or nil, message.
local function check_generate_options(raw, username)
	local options = { groups = raw.group or {} };
	local roles = raw.role or {};
	if raw.admin then
		table.insert(roles, 1, "prosody:admin");
	end
	if roles[1] then
		options.roles = roles_for_invite(roles);
	end
	if raw.reset ~= nil then
		local username = type(raw.reset) == "string" and nodeprep(raw.reset);
		if not username or username == "" then
			return nil, "Please supply a valid username to generate a reset link for";
		end
		options.reset = username;
	end
	if raw.expires_after ~= nil then
		local seconds, err = core.parse_duration(tostring(raw.expires_after));
		if not seconds then return nil, "Invalid --expires-after: "..err; end
		options.ttl = seconds;
	end
	if raw.uses ~= nil then
		local n = tonumber(raw.uses);
		if not n or n < 1 or n ~= math.floor(n) or n > 1e9 then
			return nil, "--uses must be a whole number of at least 1";
		end
		options.uses = math.floor(n);
	end
	if options.reset and options.roles then
		return nil, "--role/--admin and --reset are mutually exclusive";
	elseif options.reset and options.groups[1] then
		return nil, "--group and --reset are mutually exclusive";
	elseif options.reset and options.uses then
		return nil, "--uses and --reset are mutually exclusive";
	elseif username and options.uses and options.uses > 1 then
		return nil, "--uses needs an invite for any username: give the host, not a JID";
	end
	return options;
end

--- Admin shell commands (`prosodyctl shell`), defined once for both Prosody versions.
-- `run(print, ...)` gets the arguments of a Prosody 13 shell handler after `self` (a JID or
-- host first; then an id, or the flags table) and returns true, message or nil, error. It
-- runs in the module instance of the host concerned. `console(...)` turns 0.12 console
-- arguments (positional, no flags syntax) into those.

local function print_lines(print, lines)
	for _, line in ipairs(lines) do print(line); end
end

local function created(invite, err)
	if not invite then return nil, "Could not create the invite: "..for_admin(err); end
	return true, invite.landing_page or invite.uri;
end

local function flags_of(opts)
	return type(opts) == "table" and opts or {};
end

local host_arg = { { name = "host", type = "string" } };
local ref_args = { { name = "host", type = "string" }, { name = "id", type = "string" } };
local jid_arg = { { name = "user_jid", type = "string" } };

local function revoke_command(_, _, ref)
	local invite, err = revoke_by_ref(ref);
	if not invite then return nil, err; end
	return true, "Revoked invite "..invite.id;
end

local admin_commands = {
	{ name = "create_account", args = jid_arg,
		desc = "Create an account invitation (a JID fixes the username; a host allows any)",
		flags = { array_params = { role = true, group = true }, value_params = { expires_after = true, uses = true },
			kv_params = { admin = true } },
		run = function (_, user_jid, opts)
			local username = jid_split(user_jid);
			local options, err = check_generate_options(flags_of(opts), username);
			if not options then return nil, err; end
			return created(create_for_command(options, username));
		end };
	{ name = "create_reset", args = jid_arg,
		desc = "Create a password reset link for an account",
		flags = { value_params = { expires_after = true } },
		run = function (_, user_jid, opts)
			local username = jid_split(user_jid);
			if not username then return nil, "Supply the JID of the account to reset"; end
			local options, err = check_generate_options({ reset = username, expires_after = flags_of(opts).expires_after });
			if not options then return nil, err; end
			return created(create_account_reset(options.reset, options.ttl));
		end };
	{ name = "create_contact", args = jid_arg,
		desc = "Create an invitation to become a contact of a user",
		flags = { value_params = { expires_after = true }, kv_params = { allow_registration = true } },
		console = function (user_jid, allow_registration)
			if type(allow_registration) == "table" then return user_jid, allow_registration; end
			return user_jid, { allow_registration = allow_registration };
		end,
		run = function (_, user_jid, opts)
			local username = jid_split(user_jid);
			if not username then return nil, "Supply the JID of the user to become a contact of"; end
			opts = flags_of(opts);
			local options, err = check_generate_options({ expires_after = opts.expires_after });
			if not options then return nil, err; end
			return created(create_contact(username, opts.allow_registration, nil, options.ttl));
		end };
	{ name = "list", args = host_arg,
		desc = "List pending invitations (--all: also used, expired and revoked ones)",
		flags = { kv_params = { all = true } },
		console = function (host, all)
			if type(all) == "table" then return host, all; end
			return host, { all = all == true or all == "--all" };
		end,
		run = function (print, _, opts)
			local lines, err = list_lines(flags_of(opts).all);
			if not lines then return nil, err; end
			print_lines(print, lines);
			return true, ("%d invites"):format(#lines - 1);
		end };
	{ name = "show", args = ref_args,
		desc = "Show an invitation, by id (from list) or token",
		run = function (print, _, ref)
			local lines, err = show_lines(ref);
			if not lines then return nil, err; end
			print_lines(print, lines);
			return true, "Invitation found";
		end };
	{ name = "delete", args = ref_args, desc = "Revoke an invitation, by id or token", run = revoke_command };
	{ name = "revoke", args = ref_args, desc = "Revoke an invitation, by id or token", run = revoke_command };
	{ name = "prune", args = host_arg,
		desc = "Remove used, revoked and expired invitations",
		run = function ()
			local removed, err = prune(0);
			if not removed then return nil, "Could not prune: "..err; end
			return true, ("Removed %d used, revoked or expired invites"):format(removed);
		end };
};

-- By name, for the 0.12 console, which finds them on the host's module instance.
admin_command = {}; --luacheck: ignore 131/admin_command
for _, command in ipairs(admin_commands) do
	admin_command[command.name] = command;
end

offer_shell_commands(admin_commands);

--- prosodyctl mod_invites …
local usage = [[
usage: prosodyctl mod_invites COMMAND HOST [OPTIONS]

  generate HOST [--admin] [--role ROLE] [--group ID]... [--expires-after DURATION] [--uses N]
                      Create an account invite and print its link.
                      --admin          the new account gets the role prosody:admin
                      --role ROLE      the new account gets ROLE (--admin/--role: last one wins)
                      --group ID       add the account to group ID (repeatable)
                      --expires-after  how long the invite is valid: 30m, 12h, 3d, 2w
                      --uses N         N different accounts may register with it
  generate HOST --reset USERNAME [--expires-after DURATION]
                      Create a password reset link for USERNAME.
  list HOST [--all]   Pending invites (--all: also used, expired and revoked ones).
  show HOST ID        Details of one invite, by id (from list) or token.
  revoke HOST ID      Revoke an invite at once (also: delete).
  prune HOST          Remove used, revoked and expired invites; prints how many.]];

-- prosodyctl's argv for generate, into check_generate_options' table.
local function parse_generate_options(arg)
	local raw = { role = {}, group = {} };
	local takes_value = { ["--reset"] = "reset", ["--expires-after"] = "expires_after", ["--uses"] = "uses" };
	while #arg > 0 do
		local value = table.remove(arg, 1);
		if value == "--admin" then
			raw.admin = true;
		elseif value == "--role" then
			local rolename = table.remove(arg, 1);
			if not rolename then return nil, "Please supply a role name"; end
			-- --role and --admin override each other, as in Prosody 0.12: the last one wins.
			raw.role, raw.admin = { rolename }, nil;
		elseif value == "--group" or value == "-g" then
			local groupid = table.remove(arg, 1);
			if not groupid then return nil, "Please supply a group ID"; end
			table.insert(raw.group, groupid);
		elseif takes_value[value] then
			raw[takes_value[value]] = table.remove(arg, 1) or false;
		else
			return nil, "unexpected argument: "..value;
		end
		if value == "--admin" then raw.role = {}; end
	end
	if raw.reset == false then raw.reset = ""; end
	if raw.expires_after == false then raw.expires_after = ""; end
	if raw.uses == false then raw.uses = ""; end
	return check_generate_options(raw);
end

local commands = {};

function commands.generate(invites, arg)
	local options, err = parse_generate_options(arg);
	if not options then print(err); return 2; end
	local invite, create_err = invites.create_for_command(options);
	if not invite then
		print("Could not create the invite: "..for_admin(create_err));
		return 1;
	end
	print(invite.landing_page or invite.uri);
	return 0;
end

-- Refuses arguments beyond the `n` a command takes.
local function no_more(arg, n)
	if arg[n + 1] ~= nil then
		print("unexpected argument: "..tostring(arg[n + 1]));
		return false;
	end
	return true;
end

function commands.list(invites, arg)
	local all = arg[1] == "--all";
	if not no_more(arg, all and 1 or 0) then return 2; end
	local lines, err = invites.list_lines(all);
	if not lines then print(err); return 1; end
	for _, line in ipairs(lines) do print(line); end
	return 0;
end

function commands.show(invites, arg)
	if not no_more(arg, 1) then return 2; end
	local lines, err = invites.show_lines(arg[1]);
	if not lines then print(err); return 1; end
	for _, line in ipairs(lines) do print(line); end
	return 0;
end

function commands.revoke(invites, arg)
	if not no_more(arg, 1) then return 2; end
	local invite, err = invites.revoke_by_ref(arg[1]);
	if not invite then print(err); return 1; end
	print("Revoked invite "..invite.id);
	return 0;
end
commands.delete = commands.revoke;

function commands.prune(invites, arg)
	if not no_more(arg, 0) then return 2; end
	local removed, err = invites.prune(0);
	if not removed then print("Could not prune: "..tostring(err)); return 1; end
	print(("Removed %d used, revoked or expired invites"):format(removed));
	return 0;
end

function module.command(arg)
	local command = table.remove(arg, 1);
	if command == "--help" or command == "help" then
		print(usage);
		return 0;
	elseif command == nil then
		print(usage);
		return 2;
	elseif not commands[command] then
		print(("Unknown command '%s' (commands: generate, list, show, revoke, delete, prune; see 'prosodyctl mod_invites help')")
			:format(command));
		return 2;
	end
	local host = table.remove(arg, 1);
	if host == "--help" then
		print(usage);
		return 0;
	elseif host == nil then
		print(("Please give a host: prosodyctl mod_invites %s HOST"):format(command));
		return 2;
	elseif not prosody.hosts[host] then
		print(("Host '%s' is not configured"):format(host));
		return 1;
	end

	local sm = require "core.storagemanager";
	local mm = require "core.modulemanager";
	sm.initialize_host(host);
	-- The host's accounts, as prosodyctl's own commands load them: settling a reservation a
	-- crash left behind (show, list, prune) asks whether its account exists.
	local provider = prosody.hosts[host].users;
	if not provider or provider.name == "null" then
		usermanager.initialize_host(host);
	end
	module.host = host; --luacheck: ignore 122/module
	read_options();
	open_book();

	-- Load the landing page module if the host enables it, so invite-created handlers
	-- (landing_page) run as they would in the server.
	local invites = module:depends("invites");
	if command == "generate" then
		local invites_page_module = module:get_option_string("invites_page_module", "invites_page");
		if mm.get_modules_for_host(host):contains(invites_page_module) then
			module:depends(invites_page_module);
		end
	end
	return commands[command](invites, arg);
end
