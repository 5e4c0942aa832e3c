-- The shims, loaded into a fake module environment (the integration specs run them in a
-- real Prosody; these check the wiring in isolation).

local helpers = require "spec.helpers";

local existing_users = {};
package.loaded["core.usermanager"] = {
	user_exists = function (username) return existing_users[username] == true; end;
};
package.loaded["core.modulemanager"] = { get_module = function () return nil; end };
package.loaded["core.rostermanager"] = {};

local st = require "util.stanza";

local function load_invites(options)
	return helpers.load_shim("invites", "example.com", options);
end

describe("mod_invites", function ()
	before_each(function () existing_users = {}; end);

	describe("#create_account()", function ()
		it("should fire invite-created before returning, so handlers can add landing_page", function ()
			local env, m = load_invites();
			m:hook("invite-created", function (invite) invite.landing_page = "https://example.com/i"; end);
			local invite = assert(env.create_account());
			assert.equal("invite-created", m.events[1][1]);
			assert.equal(invite, m.events[1][2]);
			assert.equal("https://example.com/i", invite.landing_page);
			assert.is_nil(helpers.dump(m.stores).find(helpers.dump(m.stores), invite.token, 1, true));
		end);

		it("should use invite_expiry, in seconds or as a period", function ()
			local env = load_invites({ invite_expiry = 60 });
			local invite = assert(env.create_account());
			assert.equal(invite.created_at + 60, invite.expires);
			env = load_invites({ invite_expiry = "1 week" });
			invite = assert(env.create_account());
			assert.equal(invite.created_at + 604800, invite.expires);
			local m;
			env, m = load_invites({ invite_expiry = "soon" });
			invite = assert(env.create_account());
			assert.equal(invite.created_at + 604800, invite.expires);
			assert.equal("error", m.logs[1][1]);
			env, m = load_invites({ invite_expiry = "never" });
			invite = assert(env.create_account());
			assert.equal(invite.created_at + 604800, invite.expires); -- invites always expire
			assert.same({ "error", 'Option invite_expiry = "never" is not a usable period (false and "never" are not periods here); using 604800 seconds' }, m.logs[1]);
		end);

		it("should read zero and never as off for the prune timer, zero as at once for retention", function ()
			for _, off in ipairs({ 0, "0s", "0 days", false, "never" }) do
				local _, m = load_invites({ invite_prune_interval = off });
				assert.is_nil(m.timer, tostring(off));
				assert.same({}, m.logs, tostring(off));
			end
			local _, m = load_invites({ invite_retention = "0s", invite_prune_interval = "12 hrs" });
			assert.same({}, m.logs);
			assert.equal(60, m.timer.delay);
			assert.equal(43200, m.timer.fn()); -- nothing stored: the run ends at once
		end);

		it("should bind a named account invite to that username", function ()
			local env = load_invites();
			local invite = assert(env.create_account("alice"));
			assert.equal("xmpp:alice@example.com?register;preauth="..invite.token, invite.uri);
			assert.is_true(env.is_username_reserved("alice"));
			local valid = assert(env.get(invite.token));
			assert.same({ nil, "username-mismatch" }, { valid:reserve("mallory", "example.com") });
			assert.is_true(valid:reserve("alice", "example.com"));
		end);

		it("should bind the username as registration normalises it", function ()
			local env = load_invites();
			local invite = assert(env.create_account("Alice"));
			assert.equal("xmpp:alice@example.com?register;preauth="..invite.token, invite.uri);
			assert.is_true(env.is_username_reserved("alice"));
			assert.is_true(assert(env.get(invite.token)):reserve("alice", "example.com"));
			assert.same({ nil, "username-invalid" }, { env.create_account("a b@c") });
			assert.equal("xmpp:alice@example.com", assert(env.create_contact("Alice", false)).uri:match("^[^?]+"));
		end);
	end);

	describe("#create_account_reset()", function ()
		it("should reset only an existing account", function ()
			local env, m = load_invites();
			local invite = assert(env.create_account_reset("alice"));
			assert.equal("alice", invite.additional_data.allow_reset);
			assert.same({ reset = 1 }, m.metrics.created); -- counted as a reset, not a register
			assert.equal(invite.created_at + 86400, invite.expires);
			local valid = assert(env.get(invite.token));
			assert.same({ nil, "account-not-found" }, { valid:reserve("alice", "example.com") });
			assert.same({ nil, "username-mismatch" }, { valid:reserve("mallory", "example.com") });
			existing_users.alice = true;
			assert.is_true(valid:reserve("alice", "example.com"));
			assert.is_true(valid:confirm("alice", "example.com"));
			assert.same({ nil, "token-used" }, { env.get(invite.token) });
		end);
	end);

	describe("#get() host", function ()
		it("should refuse an invite for another host, everywhere it can be used", function ()
			local env = load_invites();
			local invite = assert(env.create_account());
			assert.same({ nil, "wrong-host" }, { env.get(invite.token, nil, "b.example.com") });
			local valid = assert(env.get(invite.token));
			assert.same({ nil, "wrong-host" }, { valid:reserve("alice", "b.example.com") });
			assert.is_true(valid:reserve("alice", "example.com"));
			assert.same({ nil, "wrong-host" }, { valid:confirm("alice", "b.example.com") });
			assert.same({ nil, "wrong-host" }, { valid:use(nil, "b.example.com") });
			-- Nothing spent; get_account_invite_info still sees it on its own host.
			assert.equal(1, assert(env.get_account_invite_info(invite.token)).uses_left);
			assert.is_true(valid:confirm("alice", "example.com"));
		end);
	end);

	describe("#create_contact()", function ()
		it("should validate only for its inviter", function ()
			local env = load_invites();
			local invite = assert(env.create_contact("romeo", true));
			assert.equal("xmpp:romeo@example.com?roster;preauth="..invite.token..";ibr=y", invite.uri);
			assert.is_nil((env.get(invite.token, "juliet")));
			local valid = assert(env.get(invite.token, "romeo"));
			assert.equal("romeo", valid.username);
			assert.is_true(valid:use());
			assert.same({ nil, "token-used" }, { env.get(invite.token, "romeo") });
		end);

		it("should not let a contact-only invite register", function ()
			local env = load_invites();
			local invite = assert(env.create_contact("romeo", false));
			assert.same({ nil, "token-invalid" }, { env.get(invite.token) });
		end);
	end);

	describe("#create_group()", function ()
		it("should make a reusable invite only with an explicit ttl", function ()
			local env = load_invites();
			local once = assert(env.create_group({ "g1" }));
			assert.is_false(once.reusable);
			assert.same({ "g1" }, once.additional_data.groups);
			local many = assert(env.create_group({ "g1" }, { extra = 1 }, 600));
			assert.is_true(many.reusable);
			assert.equal(1, many.additional_data.extra);
		end);
	end);

	describe("#get()", function ()
		it("should spend a single-use invite once across validated copies", function ()
			local env = load_invites();
			local invite = assert(env.create_account());
			local a, b = assert(env.get(invite.token)), assert(env.get(invite.token));
			assert.is_true(a:reserve("alice", "example.com"));
			assert.same({ nil, "token-used" }, { b:reserve("bob", "example.com") });
			assert.is_true(a:release());
			assert.is_true(b:reserve("bob", "example.com"));
			assert.is_true(b:confirm("alice", "example.com"));
			-- The same validated invite cannot register a second account.
			assert.same({ nil, "token-used" }, { b:reserve("carol", "example.com") });
		end);

		it("should not let a reusable invite register twice from one session", function ()
			local env = load_invites();
			local invite = assert(env.create_group({}, nil, 600));
			local v = assert(env.get(invite.token));
			assert.is_true(v:reserve("a1", "example.com"));
			assert.is_true(v:confirm("alice", "example.com"));
			assert.same({ nil, "token-used" }, { v:reserve("a2", "example.com") });
			assert.is_true(assert(env.get(invite.token)):reserve("a2", "example.com"));
		end);
	end);

	describe("#delete_account_invite()", function ()
		it("should revoke at once, also for an invite already validated", function ()
			local env = load_invites();
			local invite = assert(env.create_account());
			local valid = assert(env.get(invite.token));
			assert.is_true(env.delete_account_invite(invite.token));
			assert.same({ nil, "token-revoked" }, { valid:reserve("alice", "example.com") });
			assert.same({ nil, "token-revoked" }, { env.get(invite.token) });
			-- Nothing left to revoke is not an error (as Prosody's): twice, or unknown.
			assert.is_true(env.delete_account_invite(invite.token));
			assert.is_true(env.delete_account_invite("unknown"));
		end);
	end);

	describe("#pending_account_invites()", function ()
		it("should yield tokens and invites as Prosody does, skipping contact-only and spent ones", function ()
			local env, m = load_invites();
			local a = assert(env.create_account());
			local b = assert(env.create_account("bob"));
			assert(env.create_contact("romeo", false));
			local used = assert(env.create_account());
			assert.is_true(env.use(used.token));
			local seen = {};
			for token, invite in env.pending_account_invites() do
				assert.equal(token, invite.token); -- sealed at rest, opened for the listing
				assert.equal("xmpp:", invite.uri:sub(1, 5));
				seen[invite.id] = token;
			end
			assert.same({ [a.id] = a.token, [b.id] = b.token }, seen);
			assert.is_nil(helpers.dump(m.stores):find(a.token, 1, true));
		end);
	end);

	describe("housekeeping timer", function ()
		it("should prune in batches, one per turn of the event loop, and keep what is pending", function ()
			local env, m = load_invites({ invite_prune_interval = 3600, invite_retention = 0 });
			assert.equal(60, m.timer.delay); -- first run a minute after start
			local pending = assert(env.create_account());
			for _ = 1, 450 do
				assert.is_true(env.delete_account_invite(assert(env.create_account()).token));
			end
			local store = m:open_store("invites");
			local function stored()
				local n = 0;
				for _ in store:users() do n = n + 1; end
				return n;
			end
			assert.equal(451, stored());

			assert.equal(3600, m.timer.fn()); -- the interval timer: starts a run, comes back in an hour
			local turns = 1; -- the first batch ran in the interval timer's turn
			repeat
				assert.equal(0, m.timer.delay);
				turns = turns + 1;
			until m.timer.fn() ~= 0
			assert.equal(3, turns); -- 451 records, 200 per turn
			assert.equal(1, stored());
			assert.truthy(env.get(pending.token));
			local last = m.logs[#m.logs];
			assert.same({ "info", "Pruned 450 finished invites" }, last);
		end);
	end);

	describe("migration", function ()
		it("should import Prosody's pending invites and remove the plaintext copies", function ()
			local now = os.time();
			local m = helpers.fake_module("invites", "example.com");
			local legacy = m:open_store("invite_token");
			legacy.data["@"] = {
				LegacyAccount123 = { type = "register", jid = "example.com", token = "LegacyAccount123",
					allow_registration = true, created_at = now, expires = now + 600, uri = "xmpp:…" };
				LegacyExpired123 = { type = "register", jid = "example.com", token = "LegacyExpired123",
					allow_registration = true, created_at = now - 600, expires = now - 1 };
				LegacyRoster1234 = { type = "roster", jid = "romeo@example.com", token = "LegacyRoster1234",
					allow_registration = true, created_at = now, expires = now + 600 };
			};
			legacy.data.romeo = { LegacyRoster1234 = now + 600, LegacyContact123 = now + 600 };

			local env = setmetatable({ module = m; prosody = { process_type = "prosody", hosts = {} } }, { __index = _G });
			assert(loadfile(helpers.repo.."/lua/mod_invites/mod_invites.lua", "t", env))();

			assert.same({}, legacy.data);
			assert(env.get("LegacyAccount123"));
			assert.same({ nil, "token-invalid" }, { env.get("LegacyExpired123") });
			local roster = assert(env.get("LegacyRoster1234"));
			assert.equal("romeo", roster.inviter);
			assert(env.get("LegacyContact123", "romeo"));
			local stored = helpers.dump(m.stores);
			for _, token in ipairs({ "LegacyAccount123", "LegacyRoster1234", "LegacyContact123" }) do
				assert.is_nil(stored:find(token, 1, true));
			end
		end);
	end);
end);

describe("mod_invites_register", function ()
	local invites_env, register_env, m;

	before_each(function ()
		existing_users = {};
		invites_env = load_invites();
		register_env, m = helpers.load_shim("invites_register", "example.com", {}, nil, { invites = invites_env });
	end);

	local function fire(event_name, data)
		for _, h in ipairs(m.hooks[event_name]) do
			local ret = h.handler(data);
			if ret ~= nil then return ret; end
		end
	end

	local function session(kind)
		local s = { type = kind or "c2s_unauthed", secure = true, sent = {} };
		s.send = function (stanza) table.insert(s.sent, stanza); end;
		s.log = function () end;
		return s;
	end

	it("should depend on mod_invites and mod_register_ibr when invite-only", function ()
		assert.same({ "invites", "register_ibr" }, m.dependencies);
	end);

	it("should offer both register features to unauthenticated streams only", function ()
		local features = st.stanza("features");
		fire("stream-features", { origin = session("c2s"), features = features });
		assert.equal(0, #features.tags);
		fire("stream-features", { origin = session(), features = features });
		assert.truthy(features:get_child("register", "urn:xmpp:ibr-token:0"));
		assert.truthy(features:get_child("register", "urn:xmpp:invite"));
	end);

	local function preauth(s, iq_type, token)
		local iq = st.iq({ type = iq_type, id = "p1" }):tag("preauth", { xmlns = "urn:xmpp:pars:0", token = token }):up();
		assert.is_true(fire("stanza/iq/urn:xmpp:pars:0:preauth", { origin = s, stanza = iq }));
		return s.sent[#s.sent];
	end

	it("should refuse preauth of type get with bad-request", function ()
		local invite = assert(invites_env.create_account());
		local s = session();
		local reply = preauth(s, "get", invite.token);
		assert.same({ "modify", "bad-request", "A preauth request must be an iq of type 'set'" }, { reply:get_error() });
		assert.is_nil(s.validated_invite);
	end);

	it("should answer an unknown token with item-not-found and a text", function ()
		local s = session();
		local reply = preauth(s, "set", "nope");
		local etype, condition, text = reply:get_error();
		assert.same({ "cancel", "item-not-found" }, { etype, condition });
		assert.equal("This invitation is not valid", text);
	end);

	it("should refuse registration without an invite in invite-only mode", function ()
		local event = { username = "x", session = session(), allowed = true };
		fire("user-registering", event);
		assert.is_false(event.allowed);
		assert.same({ type = "modify", condition = "not-acceptable",
			text = "Registration on this server is through invitation only" }, event.error);
		assert.equal(event.error.text, event.reason);
	end);

	it("should hold a use at user-registering and give it back when registration fails", function ()
		local invite = assert(invites_env.create_account());
		local s = session();
		assert.equal("result", preauth(s, "set", invite.token).attr.type);
		local event = { username = "alice", session = s, allowed = true };
		fire("user-registering", event);
		assert.is_true(event.allowed);
		-- A second session with the same token is refused while the first holds the use.
		local s2 = session();
		preauth(s2, "set", invite.token);
		local event2 = { username = "bob", session = s2, allowed = true };
		fire("user-registering", event2);
		assert.is_false(event2.allowed);
		-- The first registration fails (the iq handler returns without user-registered).
		m.wrapped["stanza/iq/jabber:iq:register:query"](function () return true; end, "x", { origin = s });
		local event3 = { username = "bob", session = s2, allowed = true };
		fire("user-registering", event3);
		assert.is_true(event3.allowed);
	end);

	it("should not hold a use for a registration another module refused", function ()
		local invite = assert(invites_env.create_account());
		local s = session();
		preauth(s, "set", invite.token);
		fire("user-registering", { username = "alice", session = s, allowed = false });
		local s2 = session();
		preauth(s2, "set", invite.token);
		local event = { username = "bob", session = s2, allowed = true };
		fire("user-registering", event);
		assert.is_true(event.allowed);
	end);
end);
