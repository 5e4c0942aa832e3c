-- mod_invites: the invite store other modules call (`module:depends("invites")`).
--
-- A drop-in for Prosody's own mod_invites with the same Lua API, backed by the
-- prosody_invites Rust core, which owns tokens, hashing, the storage layout and the
-- invite state machine. This file reads options, hands the core Prosody stores, fires
-- events and formats what the core returns. Tokens are never stored or logged: storage
-- is keyed by their SHA-256, and logs name invites by a short id.

local id = require "util.id";
local jid_split = require "util.jid".split;
local usermanager = require "core.usermanager";

-- COMPAT: Prosody 13 has a role API (invites carry roles as a list, primary role first)
-- and admin shell commands as "shell-command" items; 0.12 keeps role sets in the "roles"
-- store and shell commands in a shared console environment.
local has_role_api = usermanager.set_user_role ~= nil;
local has_shell_items = has_role_api;

-- Prosody does not add plugin folders to package.cpath: load the core from beside this file.
local core_path = module:get_directory().."/prosody_invites.so";
local open_core, load_err = package.loadlib(core_path, "luaopen_prosody_invites");
if not open_core then
	error("Could not load the invite core from "..core_path..": "..tostring(load_err));
end
local core = open_core();

-- Seconds, or a period such as "1 week" or "3d" (Prosody 13 style) on every version.
local function period_option(name, default)
	local value = module:get_option(name, default);
	if type(value) == "number" and value >= 0 then
		return math.floor(value);
	end
	local seconds, err = core.parse_duration(tostring(value));
	if not seconds then
		module:log("error", "Option %s = %q is not a period (%s); using %d seconds", name, tostring(value), err, default);
		return default;
	end
	return seconds;
end

local default_ttl = period_option("invite_expiry", 86400 * 7);

-- Finished (used, revoked, expired) invites are kept this long, then pruned.
local retention = period_option("invite_retention", 7 * 86400);
local prune_interval = period_option("invite_prune_interval", 3600);

-- How long a registration may take between user-registering and user-registered before
-- the use it holds is given back (it is given back at once when registration fails). Only
-- a server that died mid-registration leaves a reservation to lapse.
local reservation_lease = period_option("invite_reservation_lease", 120);

local book;
local invite_store;

local function log_from_core(level, message)
	module:log(level, "%s", message);
end

local function open_book()
	invite_store = module:open_store("invites");
	book = core.new({
		invites = invite_store;
		names = module:open_store("invites_by_username");
		log = log_from_core;
		-- Settles registrations a crash cut short (see src/state.rs, settle_lapsed).
		account_exists = function (username)
			return usermanager.user_exists(username, module.host);
		end;
	});
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

local function create_invite(spec)
	spec.ttl = math.floor(spec.ttl or default_ttl);
	local invite, err = get_book():create(spec, os.time());
	if not invite then
		return nil, err; -- the core has logged what failed
	end
	created_metric:with_labels(spec.type):add(1);
	module:fire_event("invite-created", invite);
	return invite;
end

-- Create invitation to register an account (optionally restricted to the specified username).
-- Extension: `max_uses` lets that many different accounts register with one invite.
function create_account(account_username, additional_data, ttl, max_uses) --luacheck: ignore 131/create_account
	local reset = type(additional_data) == "table" and additional_data.allow_reset or nil;
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

-- Iterates pending (unexpired, unused, not revoked) invites that allow registration.
-- Yields id, invite: listed invites carry a short non-secret `id`, never the token.
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
				return invite.id, invite;
			end
		end
	end;
end

function get_account_invite_info(token) --luacheck: ignore 131/get_account_invite_info
	return get_book():get(token, nil, os.time());
end

-- Revokes an invite; takes effect at once, also for sessions that already sent preauth.
function delete_account_invite(token) --luacheck: ignore 131/delete_account_invite
	local invite, err = get_book():revoke(token, os.time());
	if not invite then
		return nil, err;
	end
	module:log("info", "Invite %s revoked", invite.id);
	return true;
end

-- Get a validated invite (or nil, err). Must call :use() on the returned invite after it
-- is actually successfully used. For "roster" invites used for a subscription, the
-- username of the local user who issued the invite must be passed.
function get(token, username)
	local now = os.time();
	local invite, err = get_book():get(token, username, now);
	if not invite then
		module:log("debug", "Invite lookup refused: %s", err);
		return nil, err;
	end
	validated_at[invite] = now;
	contact_of[invite] = username;
	return setmetatable(invite, valid_invite_mt);
end

function valid_invite_methods:use()
	local used, err = get_book():use(self.token, contact_of[self], os.time());
	if not used then
		module:log("debug", "Invite %s not used: %s", self.id, err);
		return nil, err;
	end
	return true;
end

-- Registration step 1 (user-registering): hold one use of the invite for `username`.
function valid_invite_methods:reserve(username)
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
	}, now);
	if not reserved then
		return nil, err;
	end
	holders[self] = holder;
	new_account_of[self] = not account_exists and username or nil;
	return true;
end

-- Registration step 2 (user-registered / user-password-reset): spend the held use.
-- `account` (the new or reset account's JID) is for the log line.
function valid_invite_methods:confirm(account)
	local holder = holders[self];
	holders[self] = nil;
	spent[self] = true;
	local invite, err = get_book():confirm(self.token, holder or id.short(), os.time());
	if not invite then
		return nil, err;
	end
	module:log("info", "Invite %s redeemed by %s (%d of %s uses)", invite.id, tostring(account), invite.uses,
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
		return self:confirm(username.."@"..module.host);
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

-- A preauth throttle (see src/throttle.rs) for mod_invites_register.
function new_throttle(max, period, capacity) --luacheck: ignore 131/new_throttle
	return core.throttle(max, period, capacity);
end

-- Is this username held for a pending invite? (nil, err when storage fails)
function is_username_reserved(username) --luacheck: ignore 131/is_username_reserved
	return get_book():username_reserved(username, os.time());
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

	local function import(token, invite, inviter)
		local ok, err = get_book():import_legacy(token, invite, inviter, now);
		if ok == nil then
			failed = failed + 1;
			module:log("warn", "Could not import an invite of mod_invites: %s", err);
			return false;
		end
		if ok then imported = imported + 1; end
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

-- Removes finished invites older than `keep` seconds. Returns how many, or nil, err.
function prune(keep) --luacheck: ignore 131/prune
	local invites, now = get_book(), os.time();
	-- Collect first: some stores cannot be written while their listing is open.
	local keys = {};
	for key in invite_store:users() do
		table.insert(keys, key);
	end
	local removed = 0;
	for _, key in ipairs(keys) do
		local ok, err = invites:prune(key, now, keep or 0);
		if ok == nil then
			return nil, err;
		elseif ok then
			removed = removed + 1;
		end
	end
	return removed;
end

if prosody.process_type == "prosody" then
	module:add_timer(prune_interval, function ()
		local removed, err = prune(retention);
		if not removed then
			module:log("warn", "Pruning finished invites failed: %s", err);
		elseif removed > 0 then
			module:log("info", "Pruned %d finished invites", removed);
		end
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
function list_lines(all) --luacheck: ignore 131/list_lines
	local invites, now = get_book(), os.time();
	local lines = { ("%-10s  %-8s  %-8s  %-16s  %-16s  %-11s  %s"):format(
		"ID", "TYPE", "STATUS", "CREATED (UTC)", "EXPIRES (UTC)", "USES", "FOR") };
	for key in invite_store:users() do
		local invite = invites:listed(key, now);
		if invite and (all or invite.status == "pending" or invite.status == "reserved") then
			table.insert(lines, ("%-10s  %-8s  %-8s  %-16s  %-16s  %-11s  %s"):format(
				invite.id, invite.type, invite.status, when(invite.created_at), when(invite.expires),
				uses_text(invite), describe_target(invite)));
		end
	end
	return lines;
end

-- Finds the storage key for an id (or a unique end of one) or a token.
local function resolve(ref)
	if type(ref) ~= "string" or ref == "" then
		return nil, "Please give an invite id (from 'list') or a token";
	end
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
	local invite, revoke_err = get_book():revoke_key(key, os.time());
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

-- Checks generate's options, whether from prosodyctl's argv or the Prosody 13 shell:
-- { admin, role = {...}, group = {...}, expires_after, uses, reset }.
-- Returns what create_for_command takes, or nil, message.
local function check_generate_options(raw)
	local options = { groups = raw.group or {} };
	local roles = raw.role or {};
	if raw.admin then
		table.insert(roles, 1, "prosody:admin");
	end
	if roles[1] then
		-- COMPAT: Prosody 13 takes a list (primary role first); 0.12 a set, one role.
		options.roles = has_role_api and roles or { [roles[#roles]] = true };
	end
	if raw.reset ~= nil then
		local nodeprep = require "util.encodings".stringprep.nodeprep;
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
	end
	return options;
end

--- Admin console (prosodyctl shell), Prosody 0.12
-- COMPAT: on Prosody 13 the same commands are "shell-command" items (below); writing to
-- the shared console environment there would replace the section those items fill.
if not has_shell_items then
	-- The console is global: this sets the commands once for every host it is loaded on.
	local get_module = require "core.modulemanager".get_module;
	local console_env = module:shared("/*/admin_shell/env");

	local function host_invites(host)
		local mod_invites = get_module(host, "invites");
		if not mod_invites then
			return nil, "mod_invites is not loaded on "..tostring(host);
		end
		return mod_invites;
	end

	local function print_lines(shell, lines)
		for _, line in ipairs(lines) do shell.session.print(line); end
	end

	-- luacheck: ignore 212/self
	console_env.invite = {};
	function console_env.invite:create_account(user_jid)
		local username, host = jid_split(user_jid);
		local mod_invites, err = host_invites(host);
		if not mod_invites then return nil, err; end
		local invite, create_err = mod_invites.create_account(username);
		if not invite then return nil, "Could not create the invite: "..for_admin(create_err); end
		return true, invite.landing_page or invite.uri;
	end

	function console_env.invite:create_contact(user_jid, allow_registration)
		local username, host = jid_split(user_jid);
		local mod_invites, err = host_invites(host);
		if not mod_invites then return nil, err; end
		local invite, create_err = mod_invites.create_contact(username, allow_registration);
		if not invite then return nil, "Could not create the invite: "..for_admin(create_err); end
		return true, invite.landing_page or invite.uri;
	end

	function console_env.invite:list(host, all)
		local mod_invites, err = host_invites(host);
		if not mod_invites then return nil, err; end
		local lines = mod_invites.list_lines(all == true or all == "--all");
		print_lines(self, lines);
		return true, ("%d invites"):format(#lines - 1);
	end

	function console_env.invite:show(host, ref)
		local mod_invites, err = host_invites(host);
		if not mod_invites then return nil, err; end
		local lines, show_err = mod_invites.show_lines(ref);
		if not lines then return nil, show_err; end
		print_lines(self, lines);
		return true;
	end

	function console_env.invite:delete(host, ref)
		local mod_invites, err = host_invites(host);
		if not mod_invites then return nil, err; end
		local invite, revoke_err = mod_invites.revoke_by_ref(ref);
		if not invite then return nil, revoke_err; end
		return true, "Revoked invite "..invite.id;
	end
	console_env.invite.revoke = console_env.invite.delete;

	function console_env.invite:prune(host)
		local mod_invites, err = host_invites(host);
		if not mod_invites then return nil, err; end
		local removed, prune_err = mod_invites.prune(0);
		if not removed then return nil, prune_err; end
		return true, ("Removed %d used, revoked or expired invites"):format(removed);
	end
end

--- Admin shell commands, Prosody 13: `prosodyctl shell invite list example.com` etc.
-- Each runs on the module instance of the host its first argument names.
if has_shell_items then
	local function shell_command(name, desc, args, flags, handler)
		module:add_item("shell-command", {
			section = "invite";
			section_desc = "Create and manage invitations";
			name = name;
			desc = desc;
			args = args;
			host_selector = args[1].name;
			flags = flags;
			handler = handler;
		});
	end

	local function print_lines(shell, lines)
		for _, line in ipairs(lines) do shell.session.print(line); end
	end

	-- luacheck: ignore 212/self
	shell_command("create_account",
		"Create an account invitation (a JID fixes the username; a host allows any)",
		{ { name = "user_jid", type = "string" } },
		{ array_params = { role = true, group = true }, value_params = { expires_after = true, uses = true },
		  kv_params = { admin = true } },
		function (self, user_jid, opts)
			local options, err = check_generate_options(opts or {});
			if not options then return nil, err; end
			local invite, create_err = create_for_command(options, (jid_split(user_jid)));
			if not invite then return nil, "Could not create the invite: "..for_admin(create_err); end
			return true, invite.landing_page or invite.uri;
		end);

	shell_command("create_reset", "Create a password reset link for an account",
		{ { name = "user_jid", type = "string" } },
		{ value_params = { expires_after = true } },
		function (self, user_jid, opts)
			local username = jid_split(user_jid);
			if not username then return nil, "Supply the JID of the account to reset"; end
			local options, err = check_generate_options({ reset = username, expires_after = opts and opts.expires_after });
			if not options then return nil, err; end
			local invite, create_err = create_account_reset(options.reset, options.ttl);
			if not invite then return nil, "Could not create the invite: "..for_admin(create_err); end
			return true, invite.landing_page or invite.uri;
		end);

	shell_command("create_contact", "Create an invitation to become a contact of a user",
		{ { name = "user_jid", type = "string" } },
		{ value_params = { expires_after = true }, kv_params = { allow_registration = true } },
		function (self, user_jid, opts)
			local username = jid_split(user_jid);
			if not username then return nil, "Supply the JID of the user to become a contact of"; end
			local options, err = check_generate_options({ expires_after = opts and opts.expires_after });
			if not options then return nil, err; end
			local invite, create_err = create_contact(username, opts and opts.allow_registration, nil, options.ttl);
			if not invite then return nil, "Could not create the invite: "..for_admin(create_err); end
			return true, invite.landing_page or invite.uri;
		end);

	shell_command("list", "List pending invitations (--all: also used, expired and revoked ones)",
		{ { name = "host", type = "string" } },
		{ kv_params = { all = true } },
		function (self, _, opts)
			local lines = list_lines(opts and opts.all);
			print_lines(self, lines);
			return true, ("%d invites"):format(#lines - 1);
		end);

	shell_command("show", "Show an invitation, by id (from list) or token",
		{ { name = "host", type = "string" }, { name = "id", type = "string" } },
		nil,
		function (self, _, ref)
			local lines, err = show_lines(ref);
			if not lines then return nil, err; end
			print_lines(self, lines);
			return true, "Invitation found";
		end);

	local function revoke_command(self, _, ref) --luacheck: ignore 212/self
		local invite, err = revoke_by_ref(ref);
		if not invite then return nil, err; end
		return true, "Revoked invite "..invite.id;
	end
	local ref_args = { { name = "host", type = "string" }, { name = "id", type = "string" } };
	shell_command("delete", "Revoke an invitation, by id or token", ref_args, nil, revoke_command);
	shell_command("revoke", "Revoke an invitation, by id or token", ref_args, nil, revoke_command);

	shell_command("prune", "Remove used, revoked and expired invitations",
		{ { name = "host", type = "string" } },
		nil,
		function ()
			local removed, err = prune(0);
			if not removed then return nil, err; end
			return true, ("Removed %d used, revoked or expired invites"):format(removed);
		end);
end

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

function commands.list(invites, arg)
	local all = arg[1] == "--all";
	if arg[1] and not all then print("unexpected argument: "..arg[1]); return 2; end
	for _, line in ipairs(invites.list_lines(all)) do print(line); end
	return 0;
end

function commands.show(invites, arg)
	local lines, err = invites.show_lines(arg[1]);
	if not lines then print(err); return 1; end
	for _, line in ipairs(lines) do print(line); end
	return 0;
end

function commands.revoke(invites, arg)
	local invite, err = invites.revoke_by_ref(arg[1]);
	if not invite then print(err); return 1; end
	print("Revoked invite "..invite.id);
	return 0;
end
commands.delete = commands.revoke;

function commands.prune(invites)
	local removed, err = invites.prune(0);
	if not removed then print("Could not prune: "..tostring(err)); return 1; end
	print(("Removed %d used, revoked or expired invites"):format(removed));
	return 0;
end

function module.command(arg)
	local command = table.remove(arg, 1);
	if command == "--help" or command == "help" or not commands[command] then
		print(usage);
		return command and command ~= "--help" and command ~= "help" and 2 or 0;
	end
	local host = table.remove(arg, 1);
	if host == "--help" then
		print(usage);
		return 0;
	elseif not host or not prosody.hosts[host] then
		print(("Host '%s' is not configured"):format(tostring(host)));
		return 1;
	end

	local sm = require "core.storagemanager";
	local mm = require "core.modulemanager";
	sm.initialize_host(host);
	module.host = host; --luacheck: ignore 122/module
	open_book();

	-- Load mod_invites for the host, and the landing page module if the host enables it,
	-- so invite-created handlers (landing_page) run as they would in the server.
	local invites = module:depends("invites");
	if command == "generate" then
		local invites_page_module = module:get_option_string("invites_page_module", "invites_page");
		if mm.get_modules_for_host(host):contains(invites_page_module) then
			module:depends(invites_page_module);
		end
	end
	return commands[command](invites, arg);
end
