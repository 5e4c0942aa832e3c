-- prosodyctl mod_invites …: argument handling and output, with the shim in a fake module.

local helpers = require "spec.helpers";

package.loaded["core.usermanager"] = package.loaded["core.usermanager"] or { user_exists = function () return false; end };
helpers.fake_storage_core({ initialize_host = function () end });
package.loaded["core.modulemanager"] = {
	get_module = function () return nil; end;
	get_modules_for_host = function () return { contains = function () return false; end }; end;
};
package.loaded["core.rostermanager"] = package.loaded["core.rostermanager"] or {};

describe("prosodyctl mod_invites", function ()
	local env, m, printed;

	before_each(function ()
		m = helpers.fake_module("invites", "*");
		printed = {};
		env = setmetatable({
			module = m;
			prosody = { process_type = "prosodyctl", hosts = { ["example.com"] = { users = { name = "internal_hashed" } } } };
			print = function (...) table.insert(printed, table.concat({ ... }, " ")); end;
		}, { __index = _G });
		m.environment = env;
		assert(loadfile(helpers.repo.."/lua/mod_invites/mod_invites.lua", "t", env))();
		m.provides = { invites = env };
	end);

	local function run(...)
		printed = {};
		local rc = env.module.command({ ... });
		return rc, table.concat(printed, "\n");
	end

	it("should print a URI for generate and exit 0", function ()
		local rc, out = run("generate", "example.com");
		assert.equal(0, rc);
		assert.truthy(out:match("^xmpp:example%.com%?register;preauth=[%w_-]+$"));
	end);

	it("should refuse bad input with one line and a non-zero status", function ()
		local cases = {
			{ { "generate", "nosuch.example" }, 1, "Host 'nosuch.example' is not configured" };
			{ { "list" }, 2, "Please give a host: prosodyctl mod_invites list HOST" };
			{ { "frobnicate", "example.com" }, 2, "Unknown command 'frobnicate' (commands: generate, list, show, edit, revoke, delete, tree, prune; see 'prosodyctl mod_invites help')" };
			{ { "prune", "example.com", "--dry-run" }, 2, "unexpected argument: --dry-run" };
			{ { "show", "example.com", "abcd", "extra" }, 2, "unexpected argument: extra" };
			{ { "revoke", "example.com", "abcd", "--force" }, 2, "unexpected argument: --force" };
			{ { "generate", "example.com", "--expires-after", "0s" }, 2, "Invalid --expires-after: duration must be longer than zero" };
			{ { "generate", "example.com", "--uses", "0" }, 2, "--uses must be a whole number of at least 1" };
			{ { "generate", "example.com", "--uses", "1.5" }, 2, "--uses must be a whole number of at least 1" };
			{ { "generate", "example.com", "--uses" }, 2, "--uses must be a whole number of at least 1" };
			{ { "generate", "example.com", "--expires-after", "3x" }, 2, "Invalid --expires-after: unknown unit: use s, m, h, d or w (e.g. 3d)" };
			{ { "generate", "example.com", "--expires-after" }, 2, "Invalid --expires-after: expected a number followed by s, m, h, d or w (e.g. 12h)" };
			{ { "generate", "example.com", "--reset", "alice", "--admin" }, 2, "--role/--admin and --reset are mutually exclusive" };
			{ { "generate", "example.com", "--bogus" }, 2, "unexpected argument: --bogus" };
			{ { "show", "example.com", "ffffffffff" }, 1, "No such invite" };
			{ { "show", "example.com" }, 1, "Please give an invite id (from 'list') or a token" };
			{ { "revoke", "example.com", "abcd" }, 1, "No such invite" };
			{ { "list", "example.com", "--bogus" }, 2, "unexpected argument: --bogus" };
		};
		for _, case in ipairs(cases) do
			local rc, out = run(table.unpack(case[1]));
			assert.equal(case[2], rc, table.concat(case[1], " "));
			assert.equal(case[3], out, table.concat(case[1], " "));
		end
	end);

	it("should show usage without a command, and for help", function ()
		local rc, out = run();
		assert.equal(2, rc);
		assert.truthy(out:find("usage: prosodyctl mod_invites COMMAND HOST", 1, true));
		rc, out = run("help");
		assert.equal(0, rc);
		assert.truthy(out:find("usage: prosodyctl mod_invites COMMAND HOST", 1, true));
	end);

	it("should say so when there is nothing left to revoke", function ()
		local _, uri = run("generate", "example.com");
		local token = uri:match("preauth=([%w_-]+)");
		local _, listing = run("list", "example.com");
		local invite_id = listing:match("\n(%x+)%s+register");
		assert.equal(0, (run("revoke", "example.com", invite_id)));
		local rc, out = run("revoke", "example.com", token);
		assert.equal(1, rc);
		assert.equal("Invite "..invite_id.." is already revoked; nothing to revoke", out);
	end);

	it("should list, show and revoke by id; only show prints the link", function ()
		local _, uri = run("generate", "example.com", "--uses", "3", "--expires-after", "2d");
		local token = uri:match("preauth=([%w_-]+)");
		local rc, listing = run("list", "example.com");
		assert.equal(0, rc);
		assert.is_nil(listing:find(token, 1, true));
		local id = listing:match("\n(%x+)%s+register%s+pending");
		assert.equal(10, #id);
		assert.truthy(listing:find("0/3", 1, true));
		local _, shown = run("show", "example.com", id:sub(-6));
		assert.truthy(shown:find("id:          "..id, 1, true));
		-- The token is sealed at rest: an admin asking for one invite gets its link again.
		assert.truthy(shown:find("link:        "..uri, 1, true));
		local _, by_token = run("show", "example.com", token);
		assert.equal(shown, by_token);
		assert.same({ 0, "Revoked invite "..id }, { run("revoke", "example.com", id) });
		local _, after = run("list", "example.com");
		assert.is_nil(after:find(id, 1, true));
		local _, all = run("list", "example.com", "--all");
		assert.truthy(all:find(id.."  register  revoked", 1, true));
		assert.same({ 0, "Removed 1 used, revoked or expired invites" }, { run("prune", "example.com") });
		local _, pruned = run("list", "example.com", "--all");
		assert.is_nil(pruned:find(id, 1, true));
	end);
end);

describe("core helpers", function ()
	local core = helpers.load_core();

	it("#parse_duration() should accept admin durations and explain refusals", function ()
		assert.equal(1800, core.parse_duration("30m"));
		assert.equal(1209600, core.parse_duration("2w"));
		assert.equal(43200, core.parse_duration("12 hrs"));
		assert.same({ nil, "duration must be longer than zero" }, { core.parse_duration("0h") });
	end);

	it("#throttle() should engage after max failures and lift after the period", function ()
		local t = core.throttle(2, 60, 100);
		assert.is_true(t:allows("192.0.2.1", 1000));
		t:failed("192.0.2.1", 1000);
		t:failed("192.0.2.1", 1001);
		assert.is_false(t:allows("192.0.2.1", 1002));
		assert.is_true(t:allows("192.0.2.2", 1002));
		-- Locked for one period from the failure that engaged it.
		assert.is_false(t:allows("192.0.2.1", 1060));
		assert.is_true(t:allows("192.0.2.1", 1061));
		-- IPv6 counts per /64.
		t:failed("2001:db8::1", 1000);
		t:failed("2001:db8::2", 1000);
		assert.is_false(t:allows("2001:db8::ffff", 1001));
		helpers.raises(function () core.throttle(0, 60, 100); end, "bad argument #1 to 'throttle'");
	end);

	it("#key_of() should hash anything that can be a token", function ()
		assert.equal(64, #core.key_of("abc"));
		-- Prosody's store took any string as a token: imported ones are looked up by hash.
		assert.equal(64, #core.key_of("a b"));
		assert.same({ nil, "token-invalid" }, { core.key_of(("x"):rep(1025)) });
	end);
end);
