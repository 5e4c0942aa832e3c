-- Admin commands of mod_invites, loaded with module:require("admin").
--
-- One implementation of each command (`commands` below: create_account, create_reset,
-- create_contact, list, show, edit, delete/revoke, tree, prune), with its strings, driven
-- by three thin front ends:
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
-- use_host(host) (point this instance at a host: prosodyctl), as_source(name, f, ...) (run
-- f as an admin front end: its invites count as the admin's), each_account() (the host's
-- usernames), each_account_entry() (the usernames the invite tree has an entry for).

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

-- The local username a --by JID names, or nil, error.
local function creator_arg(by)
	local node, host = jid_split(type(by) == "string" and by or "");
	node = node and nodeprep(node);
	if not node or node == "" or host ~= module.host then
		return nil, ("--by needs the JID of an account of %s"):format(module.host);
	end
	return node;
end

-- One line per invite, each given to `emit` as it is read (a listing never holds every
-- record); `all` includes used, expired and revoked ones; `by`, only those created by that
-- username. Returns how many invites it listed, or nil, err if the store fails (the lines
-- before the failure were given).
local function list_lines(all, by, emit)
	local book, now = ctx.book(), os.time();
	local row = "%-10s  %-8s  %-8s  %-16s  %-16s  %-11s  %s";
	emit(row:format("ID", "TYPE", "STATUS", "CREATED (UTC)", "EXPIRES (UTC)", "USES", "FOR"));
	local listed = 0;
	local ok, err = pcall(function ()
		for key in ctx.each_key() do
			local invite = book:listed(key, now, false); -- the list shows no link: none opened
			if invite and (all or invite.usable) and (not by or invite.creator == by) then
				local target = describe_target(invite)..(invite.note and ("; note: "..invite.note) or "");
				emit(row:format(invite.id, invite.type, invite.status, when(invite.created_at),
					when(invite.expires), uses_text(invite), target));
				listed = listed + 1;
			end
		end
	end);
	if not ok then
		module:log("error", "Could not list the stored invites: %s", err);
		return nil, "Could not list: the invite store failed (the error is logged)";
	end
	return listed;
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
	if invite.creator or invite.source then
		local by = invite.creator and (invite.creator.."@"..module.host) or invite.source;
		local via = invite.creator and invite.source and (" (via "..invite.source..")") or "";
		table.insert(lines, "created by:  "..by..via);
	end
	if invite.note then
		table.insert(lines, "note:        "..invite.note);
	end
	for _, redemption in ipairs(invite.redemptions or {}) do
		local what = "used (a contact subscription)";
		if redemption.account then
			what = ("%s@%s %s"):format(redemption.account, module.host,
				redemption.reset and "reset its password" or "signed up");
		end
		table.insert(lines, ("redeemed:    %s at %s UTC"):format(what, when(redemption.at)));
	end
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

-- Every pending invite `by` created.
local function revoke_by(by)
	local username, err = creator_arg(by);
	if not username then return nil, err, "usage"; end
	local revoked, revoke_err = ctx.book():revoke_by(username, os.time());
	if not revoked then return nil, "Could not revoke: "..for_admin(revoke_err); end
	return true, ("Revoked %d pending invites created by %s"):format(revoked, by);
end

-- Edit errors as an admin reads them.
local edit_texts = {
	["token-used"] = "it is used up; nothing to change";
	["token-revoked"] = "it is revoked; nothing to change";
	["token-expired"] = "it has expired; give --expires-after to make it valid again";
	["invalid-expiry"] = "the new expiry is not in the future";
	["uses-below-taken"] = "--uses cannot go below the uses already taken or held";
	["single-account"] = "--uses cannot exceed 1 on an invite for one account (bound, reset or contact)";
};

local function edit(ref, opts)
	if ref == nil then return nil, "Please give an invite id (from 'list') or a token", "usage"; end
	local key, err = resolve(ref);
	if not key then return nil, err; end
	local changes, now = {}, os.time();
	if opts.expires_after ~= nil then
		local seconds, duration_err = ctx.parse_duration(tostring(opts.expires_after));
		if not seconds then return nil, "Invalid --expires-after: "..duration_err, "usage"; end
		changes.expires = now + seconds;
	end
	if opts.uses ~= nil then
		local n = tonumber(opts.uses);
		if not n or n < 1 or n ~= math.floor(n) or n > 1e9 then
			return nil, "--uses must be a whole number of at least 1", "usage";
		end
		changes.max_uses = math.floor(n);
	end
	if opts.note ~= nil then
		local note = tostring(opts.note);
		if #note > 1024 then return nil, "--note takes at most 1024 bytes", "usage"; end
		changes.note = note ~= "" and note or false;
	end
	if next(changes) == nil then
		return nil, "Nothing to change: give --expires-after, --uses or --note", "usage";
	end
	local invite, edit_err = ctx.book():edit(key, changes, now);
	if not invite then
		local why = edit_texts[edit_err];
		return nil, why and ("Invite %s not changed: %s"):format(key:sub(-10), why) or ("Could not edit: "..for_admin(edit_err));
	end
	return true, ("Invite %s: %s, expires %s UTC, uses %s%s"):format(invite.id, invite.status, when(invite.expires),
		uses_text(invite), invite.note and (", note: "..invite.note) or "");
end

--- The invite tree: who invited whom, printed as it is walked (depth first; memory grows
-- with the depth and one account's invitees, not with the number of accounts).

local max_depth = 10000; -- a damaged store cannot loop the walk

local function tree_line(entry, username, depth)
	local marks = {};
	-- Marked when the server saw it go; an account removed behind its back (0.12's
	-- prosodyctl deluser) is gone all the same.
	if entry and (entry.deleted or not ctx.user_exists(username)) then table.insert(marks, "deleted"); end
	if entry and entry.invited and entry.invited[1] then
		table.insert(marks, ("invited %d"):format(#entry.invited));
	end
	if depth == 0 and entry and entry.by then
		table.insert(marks, "invited by "..entry.by.."@"..module.host);
	end
	return ("%s%s@%s  (depth %d%s)"):format(("  "):rep(depth), username, module.host, depth,
		marks[1] and ", "..table.concat(marks, ", ") or "");
end

-- Prints `username` and everyone below it; returns how many accounts it printed and the
-- deepest depth reached.
local function walk(print, book, username, depth)
	local entry = book:account(username);
	print(tree_line(entry, username, depth));
	local count, deepest = 1, depth;
	if entry and entry.invited and depth < max_depth then
		for _, child in ipairs(entry.invited) do
			local n, d = walk(print, book, child, depth + 1);
			count, deepest = count + n, math.max(deepest, d);
		end
	end
	return count, deepest;
end

local function tree(print, from)
	local book = ctx.book();
	local count, deepest, roots = 0, 0, 0;
	local function from_root(username)
		local n, d = walk(print, book, username, 0);
		count, deepest, roots = count + n, math.max(deepest, d), roots + 1;
	end
	if from ~= nil then
		local username, err = creator_arg(from);
		if not username then return nil, (err:gsub("^%-%-by", "The tree")), "usage"; end
		if not book:account(username) and not ctx.user_exists(username) then
			return nil, "No such account: "..from;
		end
		from_root(username);
	else
		-- Roots: accounts nobody invited (or invited before this was tracked), then
		-- accounts gone whose entry stays for the chain below them.
		for username in ctx.each_account() do
			local entry = book:account(username);
			if not (entry and entry.by) then from_root(username); end
		end
		for username in ctx.each_account_entry() do
			local entry = book:account(username);
			if entry and not entry.by and not ctx.user_exists(username) then
				from_root(username);
			end
		end
	end
	return true, ("%d accounts in %d trees, deepest depth %d"):format(count, roots, deepest);
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
		desc = "List pending invitations (--all: also used, expired and revoked ones; --by JID: made by that account)",
		flags = { kv_params = { all = true }, value_params = { by = true } },
		console = function (host, all)
			if type(all) == "table" then return host, all; end
			return host, { all = all == true or all == "--all" };
		end,
		run = function (print, _, opts)
			opts = flags_of(opts);
			local by;
			if opts.by ~= nil then
				local err;
				by, err = creator_arg(opts.by);
				if not by then return nil, err, "usage"; end
			end
			local listed, err = list_lines(opts.all, by, print);
			if not listed then return nil, err; end
			return true, ("%d invites"):format(listed);
		end };
	{ name = "show", args = ref_args, lines = true,
		desc = "Show an invitation, by id (from list) or token",
		run = function (print, _, ref)
			local lines, err = show_lines(ref);
			if not lines then return nil, err; end
			print_lines(print, lines);
			return true, "Invitation found";
		end };
	{ name = "edit", args = ref_args,
		desc = "Change an invitation: --expires-after DURATION, --uses N, --note TEXT",
		flags = { value_params = { expires_after = true, uses = true, note = true } },
		run = function (_, _, ref, opts) return edit(ref, flags_of(opts)); end };
	{ name = "delete", args = ref_args, desc = "Revoke an invitation, by id or token",
		run = function (_, _, ref) return revoke(ref); end };
	{ name = "revoke", args = ref_args,
		desc = "Revoke an invitation, by id or token (--by JID: every pending one that account made)",
		flags = { value_params = { by = true } },
		run = function (_, _, ref, opts)
			if type(ref) == "table" then ref, opts = nil, ref; end -- 0.12's console: revoke(host, { by = … })
			opts = flags_of(opts);
			if opts.by ~= nil then
				if ref ~= nil then return nil, "Give an invite id or --by, not both", "usage"; end
				return revoke_by(opts.by);
			end
			return revoke(ref);
		end };
	{ name = "tree", args = { { name = "host", type = "string" }, { name = "jid", type = "string" } },
		desc = "Who invited whom: every account from the roots, or from one account",
		run = function (print, _, from) return tree(print, from); end };
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
					return ctx.as_source("shell", command.run, self.session.print, ...);
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
				return ctx.as_source("console", run, self.session.print, console(first, ...));
			end
			return ctx.as_source("console", run, self.session.print, first, ...);
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
  list HOST [--all] [--by JID]
                      Pending invites (--all: also used, expired and revoked ones;
                      --by: only those the account JID made).
  show HOST ID        Details of one invite, by id (from list) or token: who made it, who
                      signed up with it.
  edit HOST ID [--expires-after DURATION] [--uses N] [--note TEXT]
                      Extend or shorten an invite, change its uses (never below what is
                      taken), set its note (--note "" removes it).
  revoke HOST ID      Revoke an invite at once (also: delete).
  revoke HOST --by JID
                      Revoke every pending invite the account JID made.
  tree HOST [JID]     Who invited whom, from the accounts nobody invited, or from JID.
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
-- Flags of the form --name VALUE (names in `takes_value`) and --name (in `switches`).
local function parse_flags(arg, takes_value, switches)
	local flags, positional = {}, {};
	while #arg > 0 do
		local value = table.remove(arg, 1);
		local name = type(value) == "string" and value:match("^%-%-(.+)$");
		local field = name and name:gsub("%-", "_");
		if field and takes_value[field] then
			local given = table.remove(arg, 1);
			if given == nil then return nil, "Expected a value after "..value; end
			flags[field] = given;
		elseif field and switches[field] then
			flags[field] = true;
		elseif name then
			return nil, "unexpected argument: "..value;
		else
			table.insert(positional, value);
		end
	end
	return flags, positional;
end

function argv.list(host, arg)
	local flags, positional = parse_flags(arg, { by = true }, { all = true });
	if not flags then return nil, positional; end
	if positional[1] ~= nil then return nil, "unexpected argument: "..tostring(positional[1]); end
	return "list", { host, flags };
end
function argv.edit(host, arg)
	local flags, positional = parse_flags(arg, { expires_after = true, uses = true, note = true }, {});
	if not flags then return nil, positional; end
	if positional[2] ~= nil then return nil, "unexpected argument: "..tostring(positional[2]); end
	return "edit", { host, positional[1], flags };
end
function argv.tree(host, arg)
	if arg[2] ~= nil then return nil, "unexpected argument: "..tostring(arg[2]); end
	return "tree", { host, arg[1] };
end
function argv.show(host, arg)
	if arg[2] ~= nil then return nil, "unexpected argument: "..tostring(arg[2]); end
	return "show", { host, arg[1] };
end
function argv.revoke(host, arg)
	local flags, positional = parse_flags(arg, { by = true }, {});
	if not flags then return nil, positional; end
	if positional[2] ~= nil then return nil, "unexpected argument: "..tostring(positional[2]); end
	return "revoke", { host, positional[1], flags };
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
		print(("Unknown command '%s' (commands: generate, list, show, edit, revoke, delete, tree, prune;"
			.." see 'prosodyctl mod_invites help')"):format(name));
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
	local ok, message, kind = ctx.as_source("prosodyctl", command.run, print, unpack(args));
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
