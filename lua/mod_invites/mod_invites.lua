-- mod_invites: the invite store other modules call (`module:depends("invites")`).
--
-- A drop-in for Prosody's own mod_invites with the same Lua API, backed by the
-- prosody_invites Rust core, which owns tokens, hashing, the storage layout and the
-- invite state machine. This file reads options, hands the core Prosody stores, fires
-- events and formats what the core returns. Tokens are never stored or logged: storage
-- is keyed by their SHA-256, and logs name invites by a short id.

local id = require "util.id";
local json = require "util.json";
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

-- Prosody does not add plugin folders to package.cpath: load the core from beside this file.
local core_path = module:get_directory().."/prosody_invites.so";
local open_core, load_err = package.loadlib(core_path, "luaopen_prosody_invites");
if not open_core then
	error("Could not load the invite core from "..core_path..": "..tostring(load_err));
end
local core = open_core();

local pack = table.pack or function (...) return { n = select("#", ...), ... }; end;
local unpack = table.unpack or unpack;

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
-- least `min` seconds. With `can_be_off`, zero, false or "never" mean off (returns nil). The
-- core reads the value; one it cannot use is logged and the default used.
local function period_option(name, default, min, can_be_off)
	local value = module:get_option(name, default);
	local seconds, err = core.period(value, min, can_be_off);
	if err then
		module:log("error", "Option %s = %q is not a usable period (%s); using %d seconds", name, tostring(value),
			err, default);
		return default;
	end
	return seconds;
end

-- Options, read once at load and again when prosodyctl points this (global) instance at a
-- host: the module is then already loaded globally and cannot be loaded for the host.
local default_ttl, retention, prune_interval, reservation_lease, token_storage, key_file, storage_lock;
local invite_url_template, invites_page_supports;
local function read_options()
	default_ttl = period_option("invite_expiry", 86400 * 7, 1);

	-- Finished (used, revoked, expired) invites are kept this long, then pruned.
	retention = period_option("invite_retention", 7 * 86400, 0);
	prune_interval = period_option("invite_prune_interval", 3600, 1, true);

	-- How long a registration may take between user-registering and user-registered before
	-- the use it holds is given back (it is given back at once when registration fails).
	-- Only a server that died mid-registration leaves a reservation to lapse.
	reservation_lease = period_option("invite_reservation_lease", 120, 1);

	-- Each change to an invite atomic between processes sharing the storage (storage.lib.lua);
	-- false: within this process only, as Prosody's own store (for measuring what it costs).
	storage_lock = module:get_option_boolean("invites_storage_lock", true);

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

	-- Landing pages on 13 (see the invite-created handler below).
	invite_url_template = makes_landing_pages and module:get_option_string("invites_page");
	invites_page_supports = module:get_option_set("invites_page_supports",
		{ "account", "contact", "account-and-contact" });
end
read_options();

local book;
local invite_store, account_store; -- as the core reads them (on SQL, listings read pages)
local storage_access; -- how changes stay atomic between processes (storage.lib.lua)
local make_storage_access = module:require("storage");

local function account_exists(username)
	return usermanager.user_exists(username, module.host);
end

local function log_from_core(level, message)
	module:log(level, "%s", message);
end

-- The stores, by the core's names for them.
local store_names = { invites = "invites", names = "invites_by_username", accounts = "invite_accounts" };

local function open_book()
	local opened = {};
	for space, name in pairs(store_names) do
		opened[space] = module:open_store(name);
	end
	storage_access = make_storage_access(module, opened, store_names, storage_lock);
	if storage_access.warning then
		-- Said by the server; prosodyctl commands would repeat it at every run.
		module:log(prosody.process_type == "prosody" and "warn" or "debug", "Invites on %s: changes are atomic "
			.. "within this process only; two processes sharing this storage could both spend one use of an invite",
			storage_access.warning);
	end
	invite_store, account_store = storage_access.store("invites"), storage_access.store("accounts");
	book = with_text_errors(core.new({
		host = module.host;
		token_storage = token_storage;
		key_file = key_file;
		invites = invite_store;
		names = opened.names;
		-- Who invited whom, and each account's invite count (governance.lib.lua).
		accounts = account_store;
		log = log_from_core;
		-- Settles registrations a crash cut short (see src/state.rs, settle_lapsed).
		account_exists = account_exists;
		-- Atomic between processes (storage.lib.lua): one of these, or neither.
		swap = storage_access.swap;
		lock_file = storage_access.lock_file;
		atomic = storage_access.atomic;
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
local spent = setmetatable({}, { __mode = "k" }); -- already registered an account

-- Metrics exist in the server only; prosodyctl has no statistics to report them to.
local no_metric = { with_labels = function () return { add = function () end }; end };
local created_metric, refused_metric = no_metric, no_metric;
if prosody.process_type == "prosody" then
	created_metric = module:metric("counter", "created", "", "Invites created", { "type" });
	refused_metric = module:metric("counter", "refused", "", "Invite creations refused", { "reason" });
end

--- Governance: provenance, quotas, the invite tree (governance.lib.lua)
local governance = module:require("governance")({
	book = get_book;
	period = core.period;
	has_role_api = has_role_api;
});

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
	guess_throttle = with_text_errors(core.throttle(throttle_max, throttle_period, throttle_capacity));
else
	if prosody.process_type == "prosody" then
		module:log("warn", "invite_throttle_max = 0: guessing invite tokens is not limited");
	end
	guess_throttle = {
		allows = function () return true; end;
		failed = function () end;
		retry_after = function () return nil; end;
	};
end

-- As Prosody: invite-created fires before the invite is stored, and what its handlers
-- change in additional_data and landing_page is stored with it. The event fires here, in
-- Lua, so its handlers may wait (util.async) as in Prosody.
local function create_invite(spec)
	if spec.ttl ~= nil and (type(spec.ttl) ~= "number" or spec.ttl ~= math.floor(spec.ttl)) then
		error("bad argument 'ttl' (whole number of seconds expected, got "..type(spec.ttl)..")", 3);
	end
	spec.ttl = spec.ttl or default_ttl;
	spec.creator, spec.source, spec.note = governance.provenance(spec.additional_data, spec.inviter);
	local allowed, refusal, retry_at = governance.charge(spec.creator);
	if not allowed then
		if refusal == "quota-exceeded" or refusal == "too-soon" then
			refused_metric:with_labels(refusal):add(1);
		end
		return nil, refusal, retry_at;
	end
	local charged = refusal;
	local invite, draft = get_book():prepare(spec, os.time());
	module:fire_event("invite-created", invite);
	local stored, err = get_book():store(draft, invite);
	if not stored then
		governance.refund(charged);
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
function create_account(account_username, additional_data, ttl, max_uses)
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
function create_account_reset(account_username, ttl)
	return create_account(account_username, { allow_reset = account_username }, ttl or 86400);
end

-- Create invitation to become a contact of a local user
function create_contact(username, allow_registration, additional_data, ttl)
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
function create_group(group_ids, additional_data, ttl)
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

-- Iterates pending (unexpired, unused, not revoked) invites that allow registration.
-- Yields token, invite as Prosody does, with the token, uri and landing_page where the
-- token was sealed; otherwise `token` is the invite's handle (the SHA-256 of the token, its
-- storage key: not a secret, and never a token; only the admin functions below take it)
-- and there is no link.
function pending_account_invites()
	local now = os.time();
	local invites = get_book();
	local next_owner, state, owner = invite_store:users();
	return function()
		while true do
			owner = next_owner(state, owner);
			if owner == nil then return nil; end
			local invite = invites:listed(owner, now);
			if invite and invite.allow_registration and invite.usable then
				return invite.token, invite;
			end
		end
	end;
end

-- A valid invite by token, or by handle (see pending_account_invites).
function get_account_invite_info(token)
	local now = os.time();
	local invite, err = get_book():get(token, nil, module.host, now);
	-- Or by handle (see pending_account_invites): the core takes it as a key, and answers
	-- nothing for a string that is not one.
	if not invite and err == "token-invalid" then
		local listed = get_book():listed(token, now);
		if listed and listed.usable then
			return listed;
		end
	end
	return invite, err;
end

-- What the core calls an invite that cannot be revoked (any more).
local over = { ["token-invalid"] = true, ["token-used"] = true, ["token-revoked"] = true, ["token-expired"] = true };

-- Revokes an invite, by token or handle; takes effect at once, also for sessions that
-- already sent preauth. As Prosody's, true also when there is nothing left to revoke.
function delete_account_invite(token)
	local now = os.time();
	local invite, err = get_book():revoke(token, now);
	if not invite and err == "token-invalid" then
		invite, err = get_book():revoke_key(token, now); -- a handle, or token-invalid again
	end
	if not invite then
		if over[err] then
			return true; -- gone already, used, expired or revoked: nothing left to revoke
		end
		return nil, err;
	end
	module:log("info", "Invite %s revoked", invite.id);
	return true;
end

-- Web requests being served by a guarded route (see "Guessing over HTTP" below), by
-- the coroutine serving them: the client address a failed lookup counts against.
local http_client_of = setmetatable({}, { __mode = "k" });
-- ...and the invite a lookup found for it (mod_invites_register_api resets a password
-- without the events a reset is spent on; see "user-password-reset" below).
local http_invite_of = setmetatable({}, { __mode = "k" });
-- Invites looked up for a host named by the caller (a stream's): every use of them must
-- name the host it is for too, so that no hook of another host can spend them unasked.
local named_host_of = setmetatable({}, { __mode = "k" });

-- Get a validated invite (or nil, err). Must call :use() on the returned invite after it
-- is actually successfully used. For "roster" invites used for a subscription, the
-- username of the local user who issued the invite must be passed.
-- Extension: `host`, the host the invite is to be used on (default this one): any other
-- gives nil, "wrong-host" (an invite belongs to the host it was made on).
function get(token, username, host)
	local now = os.time();
	local invite, err = get_book():get(token, username, host or module.host, now);
	local thread = coroutine.running();
	if not invite then
		module:log("debug", "Invite lookup refused: %s", err);
		local client = http_client_of[thread];
		-- A storage fault is not a guess, nor a page opened without a token.
		if client and err ~= "internal-server-error" and err ~= "no-token" then
			guess_throttle:failed(client, now);
			module:fire_event("invite-rejected", { reason = err, ip = client, via = "http" });
		end
		return nil, err;
	end
	validated_at[invite] = now;
	contact_of[invite] = username;
	named_host_of[invite] = host;
	if http_client_of[thread] then
		http_invite_of[thread] = invite;
	end
	return setmetatable(invite, valid_invite_mt);
end

-- Spends one use at once (contact invites, other modules). Extensions: `by` names who
-- used it, for the log line; `host` is the host it is used on (default this one).
function valid_invite_methods:use(by, host)
	if host == nil and named_host_of[self] then
		return nil, "wrong-host"; -- looked up for a stream's host: say which host uses it
	end
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
	local reserved, err = get_book():reserve(self.token, {
		holder = holder;
		username = username;
		account_exists = account_exists(username);
		validated_at = validated_at[self] or now;
		lease_until = now + reservation_lease;
	}, host, now);
	if not reserved then
		return nil, err;
	end
	holders[self] = holder;
	return true;
end

-- Registration step 2 (user-registered / user-password-reset): spend the held use, for
-- the new or reset account `username` on `host`.
function valid_invite_methods:confirm(username, host)
	local holder = holders[self];
	local invite, err = get_book():confirm(self.token, holder or id.short(), host, os.time(), username);
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
	governance.redeemed(invite, username);
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
	holders[self] = nil;
	local outcome, err = get_book():release(self.token, holder, os.time());
	if outcome == "spent" then
		spent[self] = true;
		module:log("warn", "Registration with invite %s failed after its account was created; the invite counts it",
			self.id);
	end
	return outcome and true or nil, err;
end

function use(token)
	local invite, err = get(token);
	if not invite then
		return nil, err;
	end
	return invite:use();
end

-- Is this username held for a pending invite? (nil, err when storage fails)
function is_username_reserved(username)
	return get_book():username_reserved(username, os.time());
end

-- Extension, for moderation tools: who invited the account `username` of this host.
-- Returns the inviter's username (nil for an account nobody invited: made by an admin
-- front end, registered without an invite or before invites were tracked) and the
-- account's entry { by, source, invite (id), registered, deleted, invited = { … } }.
function invited_by(username)
	username = type(username) == "string" and nodeprep(username) or nil;
	if not username then return nil; end
	local entry = get_book():account(username);
	return entry and entry.by, entry;
end

-- Extension: the usernames `username` invited (accounts made with its invites), in order.
function invitees(username)
	username = type(username) == "string" and nodeprep(username) or nil;
	local entry = username and get_book():account(username);
	return entry and entry.invited or {};
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
		-- Set on entry and cleared on return, without pcall (a handler may yield, and
		-- Lua 5.1 cannot yield through pcall): after an error the next request of this
		-- thread overwrites it.
		local thread = coroutine.running();
		http_client_of[thread], http_invite_of[thread] = ip, nil;
		local result = pack(handler(event, ...));
		http_client_of[thread], http_invite_of[thread] = nil, nil;
		return unpack(result, 1, result.n);
	end
	guarded_routes[guarded] = true;
	return guarded;
end

if prosody.process_type == "prosody" then
	-- mod_invites_register_api resets a password with a token and fires user-password-reset
	-- with the bare username, without the invite: spend the invite its request looked up.
	module:hook("user-password-reset", function (event)
		if type(event) ~= "string" then return; end
		local invite = http_invite_of[coroutine.running()];
		if not invite or invite.reset ~= nodeprep(event) then return; end
		local ok, err = invite:use(invite.reset.."@"..module.host.." (password reset)", module.host);
		if not ok then
			module:log("warn", "Password of %s was reset, but invite %s could not be marked used: %s",
				invite.reset, invite.id, err);
		end
	end);

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

--- Migration from Prosody's own mod_invites (see migration.lib.lua)
if prosody.process_type == "prosody" then
	-- Opened at start in the server, so that a storage without atomic changes between
	-- processes is said then, once.
	get_book();
	local ok, err = pcall(module:require("migration"), get_book);
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

-- The keys of the stored invites, a page at a time (on SQL, pages of a few hundred; on other
-- storage, one page of every key, collected first: some stores cannot be written while their
-- listing is open). Returns a function giving the next page (nil at the end), or nil, err.
local function key_pages()
	get_book(); -- opens the stores
	local next_page = storage_access.pages("invites");
	return function ()
		local ok, page = pcall(next_page);
		if not ok then
			module:log("error", "Could not list the stored invites: %s", page);
			return nil, "the invite store failed (the error is logged)";
		end
		return page;
	end;
end

-- Removes finished invites older than `keep` seconds at once (the prune command). Returns
-- how many, or nil, err if any could not be removed (the others are removed all the same).
function prune(keep)
	local next_page = key_pages();
	local removed, failed, now = 0, 0, os.time();
	while true do
		local keys, err = next_page();
		if err then return nil, err; end
		if not keys then break; end
		local r, f = prune_keys(keys, 1, nil, keep or 0, now);
		removed, failed = removed + r, failed + f;
	end
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
	local next_page, now = key_pages(), os.time();
	local keys, err = next_page();
	if not keys then return; end -- none, or logged: the next interval tries again
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
		if not next_key then -- this page is done: the next one, if any
			keys, err = next_page();
			next_key = keys and 1;
		end
		if next_key then
			return 0; -- again, on the next turn of the loop
		end
		pruning = false;
		if err or failed > 0 then
			module:log("warn", "Pruned %d finished invites; %d could not be read or removed%s", removed, failed,
				err and ", and the listing stopped" or "");
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

--- Admin commands (admin.lib.lua): Prosody 13's shell, 0.12's console, prosodyctl

-- prosodyctl runs the command in this instance, loaded globally: point it at the host.
local function use_host(host, with_landing_pages)
	require "core.storagemanager".initialize_host(host);
	-- The host's accounts, as prosodyctl's own commands load them: settling a reservation a
	-- crash left behind (show, list, prune) asks whether its account exists.
	local provider = prosody.hosts[host].users;
	if not provider or provider.name == "null" then
		usermanager.initialize_host(host);
	end
	module.host = host;
	read_options();
	governance.read_options();
	open_book();
	-- The landing page module, if the host enables it, so invite-created handlers
	-- (landing_page) run as they would in the server.
	if with_landing_pages then
		local invites_page_module = module:get_option_string("invites_page_module", "invites_page");
		if require "core.modulemanager".get_modules_for_host(host):contains(invites_page_module) then
			module:depends(invites_page_module);
		end
	end
end

local admin = module:require("admin")({
	book = get_book;
	each_key = function ()
		get_book(); -- opens invite_store
		return invite_store:users();
	end;
	parse_duration = core.parse_duration;
	prune = prune;
	roles_for_invite = roles_for_invite;
	has_shell_items = has_shell_items;
	user_exists = account_exists;
	as_source = governance.as_source;
	each_account = function ()
		return usermanager.users(module.host);
	end;
	each_account_entry = function ()
		local invites = get_book(); -- opens account_store
		local next_key, state, key = account_store:users();
		return function ()
			while true do
				key = next_key(state, key);
				if key == nil then return nil; end
				local username = invites:entry_username(key);
				if username then return username; end
			end
		end;
	end;
	use_host = use_host;
});
admin.offer_shell_commands();

function module.command(arg)
	return admin.prosodyctl_command(arg);
end
