-- Admin commands of mod_invites, loaded with module:require("admin").
--
-- One implementation of each command (`commands` below: create_account, create_reset,
-- create_contact, list, show, delete/revoke, prune), with its strings, driven by three thin
-- front ends:
--   * Prosody 13's shell (`prosodyctl shell invite list example.com`): "shell-command" items;
--   * Prosody 0.12's console (`invite:list("example.com")`): a shared console environment;
--   * `prosodyctl mod_invites COMMAND HOST …` on both, with exit codes (0 done, 1 refused,
--     2 usage).
-- A command's `run(print, …)` returns true, message or nil, error[, "usage"]. Decisions
-- (which invite an id means, whether it can still be revoked) are the core's.
--
-- Returns function (ctx) → front ends, where ctx gives what lives in mod_invites.lua:
-- book() (the host's invite book), each_key() (the stored keys), parse_duration, prune,
-- roles_for_invite, has_shell_items, user_exists(username) (an account of the host),
-- use_host(host) (point this instance at a host: prosodyctl).

local jid_split = require "util.jid".split;
local nodeprep = require "util.encodings".stringprep.nodeprep;
local unpack = table.unpack or unpack;

return function (ctx)

--- Formatting

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

-- Error names as an admin reads them.
local admin_texts = {
	["internal-server-error"] = "the invite store failed (the error is logged)";
	["no-such-invite"] = "No such invite";
	["ambiguous-id"] = "More than one invite matches that id; give more of it";
};
local function for_admin(err)
	return admin_texts[err] or tostring(err);
end

-- Why an invite cannot be revoked, as the core names it.
local already = { ["token-used"] = "used", ["token-revoked"] = "revoked", ["token-expired"] = "expired" };

--- What the commands do

-- One line per invite; `all` includes used, expired and revoked ones. Streams the store
-- (a listing never holds every record); nil, err if the store fails.
local function list_lines(all)
	local book, now = ctx.book(), os.time();
	local row = "%-10s  %-8s  %-8s  %-16s  %-16s  %-11s  %s";
	local lines = { row:format("ID", "TYPE", "STATUS", "CREATED (UTC)", "EXPIRES (UTC)", "USES", "FOR") };
	local ok, err = pcall(function ()
		for key in ctx.each_key() do
			local invite = book:listed(key, now, false); -- the list shows no link: none opened
			if invite and (all or invite.usable) then
				table.insert(lines, row:format(invite.id, invite.type, invite.status, when(invite.created_at),
					when(invite.expires), uses_text(invite), describe_target(invite)));
			end
		end
	end);
	if not ok then
		module:log("error", "Could not list the stored invites: %s", err);
		return nil, "Could not list: the invite store failed (the error is logged)";
	end
	return lines;
end

-- The storage key an admin means: an id (or a unique end of one), a token or a handle.
local function resolve(ref)
	if type(ref) ~= "string" or ref == "" then
		return nil, "Please give an invite id (from 'list') or a token";
	end
	local key, err = ctx.book():resolve(ref);
	if not key then return nil, for_admin(err); end
	return key;
end

local function show_lines(ref)
	local key, err = resolve(ref);
	if not key then return nil, err; end
	local invite = ctx.book():listed(key, os.time());
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

local function revoke(ref)
	local key, err = resolve(ref);
	if not key then return nil, err; end
	local invite, revoke_err = ctx.book():revoke_key(key, os.time());
	if not invite and already[revoke_err] then
		return nil, ("Invite %s is already %s; nothing to revoke"):format(key:sub(-10), already[revoke_err]);
	elseif not invite then
		return nil, "Could not revoke: "..for_admin(revoke_err);
	end
	return true, "Revoked invite "..invite.id;
end

-- generate's options, from prosodyctl's argv or the shell's flags:
-- { admin, role = {...}, group = {...}, expires_after, uses, reset }, for an invite bound
-- to `username` if given. Returns the invite's options, or nil, message.
local function check_generate_options(raw, username)
	local options = { groups = raw.group or {} };
	local roles = raw.role or {};
	if raw.admin then
		table.insert(roles, 1, "prosody:admin");
	end
	if roles[1] then
		options.roles = ctx.roles_for_invite(roles);
	end
	if raw.reset ~= nil then
		local reset = type(raw.reset) == "string" and nodeprep(raw.reset);
		if not reset or reset == "" then
			return nil, "Please supply a valid username to generate a reset link for";
		end
		options.reset = reset;
	end
	if raw.expires_after ~= nil then
		local seconds, err = ctx.parse_duration(tostring(raw.expires_after));
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

local function created(invite, err)
	if not invite then return nil, "Could not create the invite: "..for_admin(err); end
	return true, invite.landing_page or invite.uri;
end

local function create(options, username)
	if options.reset then
		return created(create_account_reset(options.reset, options.ttl));
	end
	return created(create_account(username, {
		roles = options.roles;
		groups = options.groups[1] and options.groups or nil;
	}, options.ttl, options.uses));
end

local function flags_of(opts)
	return type(opts) == "table" and opts or {};
end

local function print_lines(print, lines)
	for _, line in ipairs(lines) do print(line); end
end

--- The commands, once. `args`/`flags`: Prosody 13's shell item fields. `console(...)` turns
-- 0.12 console arguments (positional, no flags syntax) into run's. `lines`: the command
-- prints lines and its message only sums them up (prosodyctl leaves it out).

local host_arg = { { name = "host", type = "string" } };
local ref_args = { { name = "host", type = "string" }, { name = "id", type = "string" } };
local jid_arg = { { name = "user_jid", type = "string" } };

local commands = {
	{ name = "create_account", args = jid_arg,
		desc = "Create an account invitation (a JID fixes the username; a host allows any)",
		flags = { array_params = { role = true, group = true }, value_params = { expires_after = true, uses = true },
			kv_params = { admin = true } },
		run = function (_, user_jid, opts)
			local username = jid_split(user_jid);
			local options, err = check_generate_options(flags_of(opts), username);
			if not options then return nil, err, "usage"; end
			return create(options, username);
		end };
	{ name = "create_reset", args = jid_arg,
		desc = "Create a password reset link for an account",
		flags = { value_params = { expires_after = true } },
		run = function (_, user_jid, opts)
			local username = jid_split(user_jid);
			if not username then return nil, "Supply the JID of the account to reset", "usage"; end
			local options, err = check_generate_options({ reset = username, expires_after = flags_of(opts).expires_after });
			if not options then return nil, err, "usage"; end
			-- As Prosody 13.0.6 and later: a reset link for no account helps nobody.
			if not ctx.user_exists(options.reset) then
				return nil, "The specified user account does not exist: "..options.reset;
			end
			return create(options);
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
			if not username then return nil, "Supply the JID of the user to become a contact of", "usage"; end
			opts = flags_of(opts);
			local options, err = check_generate_options({ expires_after = opts.expires_after });
			if not options then return nil, err, "usage"; end
			return created(create_contact(username, opts.allow_registration, nil, options.ttl));
		end };
	{ name = "list", args = host_arg, lines = true,
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
	{ name = "show", args = ref_args, lines = true,
		desc = "Show an invitation, by id (from list) or token",
		run = function (print, _, ref)
			local lines, err = show_lines(ref);
			if not lines then return nil, err; end
			print_lines(print, lines);
			return true, "Invitation found";
		end };
	{ name = "delete", args = ref_args, desc = "Revoke an invitation, by id or token",
		run = function (_, _, ref) return revoke(ref); end };
	{ name = "revoke", args = ref_args, desc = "Revoke an invitation, by id or token",
		run = function (_, _, ref) return revoke(ref); end };
	{ name = "prune", args = host_arg,
		desc = "Remove used, revoked and expired invitations",
		run = function ()
			local removed, err = ctx.prune(0);
			if not removed then return nil, "Could not prune: "..tostring(err); end
			return true, ("Removed %d used, revoked or expired invites"):format(removed);
		end };
};
local command_named = {};
for _, command in ipairs(commands) do
	command_named[command.name] = command;
end

--- Front end 1 and 2: Prosody 13's shell, Prosody 0.12's console

-- COMPAT: 13 runs a "shell-command" item on the module instance of the host its first
-- argument names; 0.12 has one console environment for all hosts, where each command finds
-- the host's instance through a registry shared by the instances.
local function offer_shell_commands()
	if ctx.has_shell_items then
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
	local by_host = module:shared("/*/invites/console_commands");
	by_host[module.host] = command_named;
	local console_env = module:shared("/*/admin_shell/env");
	console_env.invite = {};
	for _, command in ipairs(commands) do
		local name, console = command.name, command.console;
		console_env.invite[name] = function (self, first, ...)
			local host = type(first) == "string" and select(2, jid_split(first));
			if not host then
				return nil, "Please give the host (or a JID) as the first argument";
			end
			local host_commands = by_host[host];
			if not host_commands then
				return nil, "mod_invites is not loaded on "..host;
			end
			local run = host_commands[name].run;
			if console then
				return run(self.session.print, console(first, ...));
			end
			return run(self.session.print, first, ...);
		end;
	end
end

--- Front end 3: prosodyctl mod_invites …

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

-- generate's argv as the shell's create_account/create_reset arguments, or nil, error.
local function generate_args(host, arg)
	local flags = { role = {}, group = {} };
	local takes_value = { ["--reset"] = "reset", ["--expires-after"] = "expires_after", ["--uses"] = "uses" };
	while #arg > 0 do
		local value = table.remove(arg, 1);
		if value == "--admin" then
			flags.admin, flags.role = true, {};
		elseif value == "--role" then
			local rolename = table.remove(arg, 1);
			if not rolename then return nil, "Please supply a role name"; end
			-- --role and --admin override each other, as in Prosody 0.12: the last one wins.
			flags.role, flags.admin = { rolename }, nil;
		elseif value == "--group" or value == "-g" then
			local groupid = table.remove(arg, 1);
			if not groupid then return nil, "Please supply a group ID"; end
			table.insert(flags.group, groupid);
		elseif takes_value[value] then
			flags[takes_value[value]] = table.remove(arg, 1) or "";
		else
			return nil, "unexpected argument: "..value;
		end
	end
	if flags.reset == nil then
		return "create_account", { host, flags };
	end
	-- A reset invite takes no other flag but its expiry: the shell's create_reset checks
	-- that; here the same checks run on the whole set, for the same messages.
	local options, err = check_generate_options(flags);
	if not options then return nil, err; end
	return "create_reset", { options.reset.."@"..host, { expires_after = flags.expires_after } };
end

-- Each prosodyctl command: the shell command it runs and its arguments, or nil, error.
local argv = {};
function argv.generate(host, arg) return generate_args(host, arg); end
function argv.list(host, arg)
	local all = arg[1] == "--all";
	if arg[all and 2 or 1] ~= nil then return nil, "unexpected argument: "..tostring(arg[all and 2 or 1]); end
	return "list", { host, { all = all } };
end
function argv.show(host, arg)
	if arg[2] ~= nil then return nil, "unexpected argument: "..tostring(arg[2]); end
	return "show", { host, arg[1] };
end
function argv.revoke(host, arg)
	if arg[2] ~= nil then return nil, "unexpected argument: "..tostring(arg[2]); end
	return "revoke", { host, arg[1] };
end
argv.delete = argv.revoke;
function argv.prune(host, arg)
	if arg[1] ~= nil then return nil, "unexpected argument: "..tostring(arg[1]); end
	return "prune", { host };
end

local function prosodyctl_command(arg)
	local name = table.remove(arg, 1);
	if name == "--help" or name == "help" then
		print(usage);
		return 0;
	elseif name == nil then
		print(usage);
		return 2;
	elseif not argv[name] then
		print(("Unknown command '%s' (commands: generate, list, show, revoke, delete, prune; see 'prosodyctl mod_invites help')")
			:format(name));
		return 2;
	end
	local host = table.remove(arg, 1);
	if host == "--help" then
		print(usage);
		return 0;
	elseif host == nil then
		print(("Please give a host: prosodyctl mod_invites %s HOST"):format(name));
		return 2;
	elseif not prosody.hosts[host] then
		print(("Host '%s' is not configured"):format(host));
		return 1;
	end
	local command_name, args = argv[name](host, arg);
	if not command_name then
		print(args);
		return 2;
	end
	ctx.use_host(host, name == "generate");
	local command = command_named[command_name];
	local ok, message, kind = command.run(print, unpack(args));
	if not ok then
		print(message);
		return kind == "usage" and 2 or 1;
	end
	if not command.lines then
		print(message);
	end
	return 0;
end

return {
	offer_shell_commands = offer_shell_commands;
	prosodyctl_command = prosodyctl_command;
};

end
