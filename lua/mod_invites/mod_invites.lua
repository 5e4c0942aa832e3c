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

-- COMPAT: Prosody 13 has get_option_period (accepts "1 week" as well as seconds).
local default_ttl;
if module.get_option_period then
	default_ttl = module:get_option_period("invite_expiry", "1 week");
else
	default_ttl = module:get_option_number("invite_expiry", 86400 * 7);
end
default_ttl = math.floor(default_ttl);

-- How long a registration may take between user-registering and user-registered before
-- the use it holds is given back (it is given back at once when registration fails).
local reservation_lease = 120;

-- Prosody does not add plugin folders to package.cpath: load the core from beside this file.
local core_path = module:get_directory().."/prosody_invites.so";
local open_core, load_err = package.loadlib(core_path, "luaopen_prosody_invites");
if not open_core then
	error("Could not load the invite core from "..core_path..": "..tostring(load_err));
end
local core = open_core();

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
local spent = setmetatable({}, { __mode = "k" }); -- already registered an account

local function create_invite(spec)
	spec.ttl = math.floor(spec.ttl or default_ttl);
	local invite, err = get_book():create(spec, os.time());
	if not invite then
		module:log("warn", "Failed to store %s invite: %s", spec.type, err);
		return nil, err;
	end
	module:fire_event("invite-created", invite);
	return invite;
end

-- Create invitation to register an account (optionally restricted to the specified username)
function create_account(account_username, additional_data, ttl) --luacheck: ignore 131/create_account
	local reset = type(additional_data) == "table" and additional_data.allow_reset or nil;
	return create_invite({
		type = "register";
		jid = account_username and (account_username.."@"..module.host) or module.host;
		allow_registration = true;
		additional_data = additional_data;
		ttl = ttl;
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
	local reserved, err = get_book():reserve(self.token, {
		holder = holder;
		username = username;
		account_exists = usermanager.user_exists(username, module.host);
		validated_at = validated_at[self] or now;
		lease_until = now + reservation_lease;
	}, now);
	if not reserved then
		return nil, err;
	end
	holders[self] = holder;
	return true;
end

-- Registration step 2 (user-registered / user-password-reset): spend the held use.
function valid_invite_methods:confirm()
	local holder = holders[self];
	holders[self] = nil;
	spent[self] = true;
	local invite, err = get_book():confirm(self.token, holder or id.short(), os.time());
	if not invite then
		return nil, err;
	end
	module:log("info", "Invite %s redeemed (%d of %s uses)", invite.id, invite.uses, invite.max_uses or "unlimited");
	return true;
end

-- Registration failed between the two steps: give the held use back.
function valid_invite_methods:release()
	local holder = holders[self];
	if not holder then
		return true;
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

--- shell command
do
	-- Since the console is global this overwrites the command for
	-- each host it's loaded on, but this should be fine.

	local get_module = require "core.modulemanager".get_module;

	local console_env = module:shared("/*/admin_shell/env");

	-- luacheck: ignore 212/self
	console_env.invite = {};
	function console_env.invite:create_account(user_jid)
		local username, host = jid_split(user_jid);
		local mod_invites, err = get_module(host, "invites");
		if not mod_invites then return nil, err or "mod_invites not loaded on this host"; end
		local invite, err = mod_invites.create_account(username);
		if not invite then return nil, err; end
		return true, invite.landing_page or invite.uri;
	end

	function console_env.invite:create_contact(user_jid, allow_registration)
		local username, host = jid_split(user_jid);
		local mod_invites, err = get_module(host, "invites");
		if not mod_invites then return nil, err or "mod_invites not loaded on this host"; end
		local invite, err = mod_invites.create_contact(username, allow_registration);
		if not invite then return nil, err; end
		return true, invite.landing_page or invite.uri;
	end
end

--- prosodyctl command
local function generate_usage()
	print("usage: prosodyctl mod_"..module.name.." generate DOMAIN --reset USERNAME")
	print("usage: prosodyctl mod_"..module.name.." generate DOMAIN [--admin] [--role ROLE] [--group GROUPID]...")
	print()
	print("This command has two modes: password reset and new account.")
	print("If --reset is given, the command operates in password reset mode and in new account mode otherwise.")
	print()
	print("required arguments in password reset mode:")
	print()
	print("    --reset USERNAME  Generate a password reset link for the given USERNAME.")
	print()
	print("optional arguments in new account mode:")
	print()
	print("    --admin           Make the new user privileged")
	print("                      Equivalent to --role prosody:admin")
	print("    --role ROLE       Grant the given ROLE to the new user")
	print("    --group GROUPID   Add the user to the group with the given ID")
	print("                      Can be specified multiple times")
	print()
	print("--role and --admin override each other; the last one wins")
	print("--group can be specified multiple times; the user will be added to all groups.")
	print()
	print("--reset and the other options cannot be mixed.")
end

function module.command(arg)
	if #arg < 2 or arg[1] ~= "generate" then
		print("usage: prosodyctl mod_"..module.name.." generate example.com");
		return 2;
	end
	table.remove(arg, 1); -- pop command

	local host = table.remove(arg, 1);
	if not prosody.hosts[host] then
		print("Host "..tostring(host).." does not exist in the configuration");
		return 1;
	end

	local allow_reset;
	local roles;
	local groups = {};

	while #arg > 0 do
		local value = table.remove(arg, 1);
		if value == "--help" then
			generate_usage();
			return 2;
		elseif value == "--reset" then
			local nodeprep = require "util.encodings".stringprep.nodeprep;
			local username = arg[1] and nodeprep(arg[1]);
			table.remove(arg, 1);
			if not username or username == "" then
				print("Please supply a valid username to generate a reset link for");
				return 2;
			end
			allow_reset = username;
		elseif value == "--admin" then
			roles = { ["prosody:admin"] = true };
		elseif value == "--role" then
			local rolename = table.remove(arg, 1);
			if not rolename then
				print("Please supply a role name");
				return 2;
			end
			roles = { [rolename] = true };
		elseif value == "--group" or value == "-g" then
			local groupid = table.remove(arg, 1);
			if not groupid then
				print("Please supply a group ID");
				return 2;
			end
			table.insert(groups, groupid);
		else
			print("unexpected argument: "..value);
			return 2;
		end
	end

	if allow_reset and roles then
		print("--role/--admin and --reset are mutually exclusive");
		return 2;
	elseif allow_reset and #groups > 0 then
		print("--group and --reset are mutually exclusive");
		return 2;
	end

	local sm = require "core.storagemanager";
	local mm = require "core.modulemanager";
	sm.initialize_host(host);
	module.host = host; --luacheck: ignore 122/module
	open_book();

	-- Load mod_invites for the host, and the optional landing page module if it is enabled
	-- there, so invite-created handlers (landing_page) run as they would in the server.
	local invites = module:depends("invites");
	local invites_page_module = module:get_option_string("invites_page_module", "invites_page");
	if mm.get_modules_for_host(host):contains(invites_page_module) then
		module:depends(invites_page_module);
	end

	local invite, err;
	if allow_reset then
		invite, err = invites.create_account_reset(allow_reset);
	else
		invite, err = invites.create_account(nil, {
			roles = roles;
			groups = #groups > 0 and groups or nil;
		});
	end
	if not invite then
		print("Could not create the invite: "..tostring(err));
		return 1;
	end

	print(invite.landing_page or invite.uri);
	return 0;
end
