-- The shims, loaded into a fake module environment (the integration specs run them in a
-- real Prosody; these check the wiring in isolation).

local helpers = require "spec.helpers";

local existing_users = helpers.fake_prosody_core();

local function load_invites(options)
	return helpers.load_shim("invites", "example.com", options);
end

describe("mod_invites", function ()
	before_each(function () for name in pairs(existing_users) do existing_users[name] = nil; end end);

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

		it("should store what invite-created handlers change, also when they wait", function ()
			local env, m = load_invites();
			m:hook("invite-created", function (invite)
				coroutine.yield(); -- e.g. util.async waiting on a web hook
				invite.additional_data = { groups = { "default" } };
			end);
			local co = coroutine.create(function () return env.create_account(); end);
			assert(coroutine.resume(co));
			assert.is_nil(next(m:open_store("invites").data)); -- nothing stored while it waits
			local ok, invite = coroutine.resume(co);
			assert(ok and invite, invite);
			assert.same({ groups = { "default" } }, assert(env.get_account_invite_info(invite.token)).additional_data);
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

		it("should make every use of an invite looked up for a named host name its host too", function ()
			local env = load_invites();
			local invite = assert(env.create_account());
			-- As the preauth handler looks it up: for the stream's host.
			local named = assert(env.get(invite.token, nil, "example.com"));
			assert.same({ nil, "wrong-host" }, { named:use() });
			assert.same({ nil, "wrong-host" }, { named:use("x", "b.example.com") });
			assert.is_true(named:use("x", "example.com"));
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

	describe("guarded web routes", function ()
		-- A route of mod_invites_page as mod_http would call it, in a thread of its own.
		local function start(handler, ip, token)
			local co = coroutine.create(handler);
			local ok, result = coroutine.resume(co, { request = { ip = ip, url = { query = token } } });
			assert(ok, result);
			return co, result;
		end
		local function finish(co, result)
			if coroutine.status(co) == "suspended" then
				local ok;
				ok, result = coroutine.resume(co);
				assert(ok, result);
			end
			return type(result) == "table" and result.status_code or result;
		end

		it("should count a route's failed lookups per client, across yields, and refuse with 429", function ()
			local env, m = load_invites({ invite_throttle_max = 2, invite_throttle_period = 60 });
			local invite = assert(env.create_account());
			local route = {
				["GET"] = function (event)
					coroutine.yield(); -- a handler waiting (util.async)
					return env.get(event.request.url.query) and 200 or 404;
				end;
				["GET /static/*"] = "a file";
			};
			m:fire_event("item-added/http-provider", { item = { _provided_by = "invites_page", route = route } });
			assert.equal("a file", route["GET /static/*"]); -- only functions are wrapped

			-- A request from .1 waits while .2 guesses twice: .2's failures are .2's.
			local waiting = start(route["GET"], "192.0.2.1", invite.token);
			assert.equal(404, finish(start(route["GET"], "192.0.2.2", "guess-one")));
			assert.equal(404, finish(start(route["GET"], "192.0.2.2", "guess-two")));
			assert.equal(200, finish(waiting));
			-- .2 is locked: a valid token is refused before any lookup; .1 is not.
			local refused = finish(start(route["GET"], "192.0.2.2", invite.token));
			assert.equal(429, refused);
			assert.equal(200, finish(start(route["GET"], "192.0.2.1", invite.token)));
			-- A page opened without a token is not a guess.
			assert.equal(404, finish(start(route["GET"], "192.0.2.1", nil)));
			assert.equal(404, finish(start(route["GET"], "192.0.2.1", nil)));
			assert.equal(200, finish(start(route["GET"], "192.0.2.1", invite.token)));
		end);

		it("should leave the routes of other modules alone", function ()
			local _, m = load_invites({ invite_throttle_max = 1 });
			local handler = function () return 200; end;
			local route = { ["GET"] = handler };
			m:fire_event("item-added/http-provider", { item = { _provided_by = "http_admin_api", route = route } });
			assert.equal(handler, route["GET"]);
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
			m.environment = env;
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
