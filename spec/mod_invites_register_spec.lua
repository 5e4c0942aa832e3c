-- mod_invites_register, loaded into a fake module environment over a real mod_invites (the
-- integration specs run it in a real Prosody; these check the wiring in isolation).

local helpers = require "spec.helpers";

local existing_users = helpers.fake_prosody_core();

local st = require "util.stanza";
local errors = require "util.error";

-- The registry the shim makes with errors.init, kept for the spec to read.
local registry;
package.loaded["util.error"] = setmetatable({
	init = function (...)
		registry = errors.init(...);
		return registry;
	end;
}, { __index = errors });

local function load_invites(options)
	return helpers.load_shim("invites", "example.com", options);
end

describe("mod_invites_register", function ()
	local invites_env, m;

	before_each(function ()
		for name in pairs(existing_users) do existing_users[name] = nil; end
		invites_env = load_invites();
		m = select(2, helpers.load_shim("invites_register", "example.com", {}, nil, { invites = invites_env }));
	end);

	local function fire(event_name, data)
		for _, h in ipairs(m.hooks[event_name]) do
			local ret = h.handler(data);
			if ret ~= nil then return ret; end
		end
	end

	local function session(kind)
		local s = { type = kind or "c2s_unauthed", host = "example.com", secure = true, sent = {} };
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
		assert.is_true(errors.is_error(event.error));
		assert.same({ type = "modify", condition = "not-acceptable",
			text = "Registration on this server is through invitation only" },
			{ type = event.error.type, condition = event.error.condition, text = event.error.text });
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

describe("mod_invites_register refusals", function ()
	local m;

	before_each(function ()
		for name in pairs(existing_users) do existing_users[name] = nil; end
		m = select(2, helpers.load_shim("invites_register", "example.com", {}, nil, { invites = load_invites() }));
	end);

	-- The stanza error a refusal gives, and the reason label it counts under.
	local function refusal(name)
		local reply = st.error_reply(st.iq({ type = "set", id = "r1" }), registry.new(name));
		local counts = m.metrics.rejected;
		for label in pairs(counts) do counts[label] = nil; end
		for _, h in ipairs(m.hooks["invite-rejected"]) do h.handler({ reason = name }); end
		local etype, condition, text = reply:get_error();
		return { etype, condition, text, (next(counts)) };
	end

	it("should know exactly these refusals", function ()
		assert.same({ "account-not-found", "internal-server-error", "invite-only", "no-token", "preauth-not-set",
			"throttled", "token-expired", "token-invalid", "token-revoked", "token-used", "username-mismatch",
			"username-reserved", "username-taken", "wrong-host" }, helpers.keys(registry.registry));
	end);

	it("should map each refusal to its stanza error and metric label", function ()
		assert.same({ "modify", "bad-request", "The invitation token is missing", "invalid" }, refusal("no-token"));
		assert.same({ "cancel", "item-not-found", "This invitation is not valid", "invalid" }, refusal("token-invalid"));
		assert.same({ "cancel", "item-not-found", "This invitation has expired", "expired" }, refusal("token-expired"));
		assert.same({ "cancel", "item-not-found", "This invitation has already been used", "used" }, refusal("token-used"));
		assert.same({ "cancel", "item-not-found", "This invitation has been revoked", "revoked" }, refusal("token-revoked"));
		assert.same({ "modify", "not-acceptable", "This invitation is for another username", "username-mismatch" },
			refusal("username-mismatch"));
		assert.same({ "cancel", "conflict", "This username is reserved for an invited user", "username-reserved" },
			refusal("username-reserved"));
		assert.same({ "cancel", "conflict", "The requested username already exists.", "username-taken" },
			refusal("username-taken"));
		assert.same({ "modify", "not-acceptable", "This invitation only resets the password of an existing account",
			"account-not-found" }, refusal("account-not-found"));
		assert.same({ "wait", "internal-server-error", "The invitation could not be checked, please try again later",
			"internal-server-error" }, refusal("internal-server-error"));
		assert.same({ "modify", "not-acceptable", "Registration on this server is through invitation only", "invite-only" },
			refusal("invite-only"));
		assert.same({ "modify", "bad-request", "A preauth request must be an iq of type 'set'", "preauth-not-set" },
			refusal("preauth-not-set"));
		assert.same({ "cancel", "not-allowed", "This invitation is for another host", "wrong-host" }, refusal("wrong-host"));
		assert.same({ "wait", "policy-violation", "Too many invalid invitations from your address, please try again later",
			"throttled" }, refusal("throttled"));
	end);

	it("should count a reason outside the registry under its own name", function ()
		for _, h in ipairs(m.hooks["invite-rejected"]) do h.handler({ reason = "something-else" }); end
		assert.same({ ["something-else"] = 1 }, m.metrics.rejected);
	end);
end);
