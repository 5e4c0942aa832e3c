-- The Lua boundary of the Rust core (build/plugins/mod_invites/prosody_invites.so):
-- argument checking, error names, what reaches storage and logs.

local helpers = require "spec.helpers";

describe("prosody_invites core", function ()
	local core, store, names, logs, book;
	local now = 1700000000;

	before_each(function ()
		core = helpers.load_core();
		store, names = helpers.memory_store(), helpers.memory_store();
		logs = {};
		book = core.new({
			host = "example.com";
			invites = store;
			names = names;
			log = function (level, message) table.insert(logs, { level, message }); end;
		});
	end);

	local function account(extra)
		local spec = { type = "register", jid = "example.com", allow_registration = true, ttl = 3600 };
		for k, v in pairs(extra or {}) do spec[k] = v; end
		return spec;
	end

	describe("#new()", function ()
		it("should raise on a missing store", function ()
			helpers.raises(function () core.new({ host = "example.com", names = names }); end,
				"bad field 'invites' in argument to 'new' (store expected, got nil)");
			helpers.raises(function () core.new("x"); end,
				"bad argument #1 to 'new' (table expected, got string)");
		end);
		it("should raise without the host the book serves", function ()
			helpers.raises(function () core.new({ invites = store, names = names }); end,
				"bad field 'host' in argument to 'new' (non-empty string expected, got nil)");
		end);
	end);

	describe("#create()", function ()
		it("should return the invite with token, uri and Prosody's fields", function ()
			local invite = assert(book:create(account({ additional_data = { roles = { ["prosody:admin"] = true } } }), now));
			assert.is_string(invite.token);
			assert.equal("xmpp:example.com?register;preauth="..invite.token, invite.uri);
			assert.equal("register", invite.type);
			assert.equal("example.com", invite.jid);
			assert.is_true(invite.allow_registration);
			assert.equal(now, invite.created_at);
			assert.equal(now + 3600, invite.expires);
			assert.is_false(invite.reusable);
			assert.is_true(invite.additional_data.roles["prosody:admin"]);
			assert.equal(10, #invite.id);
		end);

		it("should store one record under the hash, without the token", function ()
			local invite = assert(book:create(account(), now));
			local keys = helpers.keys(store.data);
			assert.equal(1, #keys);
			assert.equal(64, #keys[1]);
			assert.equal(invite.id, keys[1]:sub(-10));
			assert.is_nil(helpers.dump(store.data):find(invite.token, 1, true));
			assert.is_nil(helpers.dump(logs):find(invite.token, 1, true));
		end);

		it("should refuse quiet coercions", function ()
			helpers.raises(function () book:create(account(), 1.5); end,
				"bad argument #2 to 'create' (integer expected, got number)");
			helpers.raises(function () book:create(account(), "1"); end,
				"bad argument #2 to 'create' (integer expected, got string)");
			helpers.raises(function () book:create(account({ ttl = 1.5 }), now); end);
			helpers.raises(function () book:create(account({ type = "other" }), now); end);
			helpers.raises(function () book:create(account({ max_uses = 0 }), now); end);
			helpers.raises(function () book:create(account({ additional_data = { f = print } }), now); end);
		end);

		it("should say internal-server-error when storage fails", function ()
			store.fail = "disk full";
			local invite, err = book:create(account(), now);
			assert.is_nil(invite);
			assert.equal("internal-server-error", err);
			assert.equal("error", logs[#logs][1]);
			assert.truthy(logs[#logs][2]:find("disk full", 1, true));
		end);
	end);

	describe("#get()", function ()
		it("should rebuild token and uri from the token it was given", function ()
			local created = assert(book:create(account(), now));
			local invite = assert(book:get(created.token, nil, "example.com", now + 1));
			assert.equal(created.token, invite.token);
			assert.equal(created.uri, invite.uri);
			assert.equal("pending", invite.status);
		end);

		it("should name each refusal", function ()
			local created = assert(book:create(account(), now));
			assert.same({ nil, "token-expired" }, { book:get(created.token, nil, "example.com", now + 3601) });
			assert.same({ nil, "token-invalid" }, { book:get("unknown", nil, "example.com", now) });
			assert.same({ nil, "token-invalid" }, { book:get("odd token \0", nil, "example.com", now) });
			assert.same({ nil, "token-invalid" }, { book:get(("x"):rep(1025), nil, "example.com", now) });
			assert.same({ nil, "no-token" }, { book:get(nil, nil, "example.com", now) });
			assert.same({ nil, "token-invalid" }, { book:get(created.token, "romeo", "example.com", now) });
			helpers.raises(function () book:get(42, nil, "example.com", now); end);
		end);

		it("should treat a corrupt record as invalid and log it once, without the token", function ()
			for _, corrupt in ipairs({ 5, "text", { record = 5 }, { record = "{" }, { other = true } }) do
				local created = assert(book:create(account(), now));
				local key = helpers.only_key_for(store.data, created.id);
				store.data[key] = corrupt;
				local before = #logs;
				assert.same({ nil, "token-invalid" }, { book:get(created.token, nil, "example.com", now) });
				assert.equal(before + 1, #logs);
				assert.equal("warn", logs[#logs][1]);
				assert.truthy(logs[#logs][2]:find(created.id, 1, true));
				assert.is_nil(logs[#logs][2]:find(created.token, 1, true));
			end
		end);

		it("should survive a store that raises", function ()
			local created = assert(book:create(account(), now));
			store.raise = "boom";
			assert.same({ nil, "internal-server-error" }, { book:get(created.token, nil, "example.com", now) });
		end);
	end);

	describe("host", function ()
		it("should refuse every use of an invite for another host, before any lookup", function ()
			local created = assert(book:create(account(), now));
			local other = "b.example.com";
			assert.same({ nil, "wrong-host" }, { book:get(created.token, nil, other, now) });
			assert.same({ nil, "wrong-host" }, { book:get("unknown", nil, other, now) });
			assert.same({ nil, "wrong-host" }, { book:reserve(created.token, { holder = "h", username = "alice",
				validated_at = now, lease_until = now + 60 }, other, now) });
			assert.same({ nil, "wrong-host" }, { book:confirm(created.token, "h", other, now) });
			assert.same({ nil, "wrong-host" }, { book:use(created.token, nil, other, now) });
			-- Nothing was spent: the invite still works on its own host.
			assert.equal(1, assert(book:get(created.token, nil, "example.com", now)).uses_left);
			helpers.raises(function () book:reserve(created.token, { holder = "h", username = "alice",
				validated_at = now, lease_until = now + 60 }, nil, now); end,
				"bad argument #3 to 'reserve' (string expected, got nil)");
		end);
	end);

	describe("#reserve() #confirm() #release()", function ()
		local function claim(holder, username)
			return { holder = holder, username = username, account_exists = false,
				validated_at = now, lease_until = now + 120 };
		end

		it("should let one single-use invite create one account", function ()
			local created = assert(book:create(account(), now));
			assert(book:reserve(created.token, claim("a", "alice"), "example.com", now));
			assert.same({ nil, "token-used" }, { book:reserve(created.token, claim("b", "bob"), "example.com", now) });
			assert(book:confirm(created.token, "a", "example.com", now));
			assert.same({ nil, "token-used" }, { book:get(created.token, nil, "example.com", now) });
		end);

		it("should give the use back on release", function ()
			local created = assert(book:create(account(), now));
			assert(book:reserve(created.token, claim("a", "alice"), "example.com", now));
			assert.equal("given-back", book:release(created.token, "a", now));
			assert.equal("nothing", book:release(created.token, "a", now));
			assert(book:reserve(created.token, claim("b", "bob"), "example.com", now));
		end);

		it("should keep a bound name for its invite", function ()
			local bound = assert(book:create(account({ jid = "alice@example.com", username = "alice" }), now));
			local other = assert(book:create(account(), now));
			assert.is_true(book:username_reserved("alice", now));
			assert.same({ nil, "username-reserved" }, { book:reserve(other.token, claim("o", "alice"), "example.com", now) });
			assert.same({ nil, "username-mismatch" }, { book:reserve(bound.token, claim("b", "mallory"), "example.com", now) });
			assert(book:reserve(bound.token, claim("b", "alice"), "example.com", now));
		end);

		it("should check claim fields", function ()
			local created = assert(book:create(account(), now));
			helpers.raises(function () book:reserve(created.token, { username = "x" }, "example.com", now); end);
			helpers.raises(function ()
				book:reserve(created.token, { holder = "h", username = "x", validated_at = "soon", lease_until = 1 }, "example.com", now);
			end);
		end);
	end);

	describe("#revoke()", function ()
		it("should stop the invite at once", function ()
			local created = assert(book:create(account(), now));
			assert(book:revoke(created.token, now));
			assert.same({ nil, "token-revoked" }, { book:get(created.token, nil, "example.com", now) });
			assert.same({ nil, "token-revoked" }, { book:use(created.token, nil, "example.com", now) });
		end);
	end);

	describe("#listed()", function ()
		it("should list a hash-only invite by its handle, with no link", function ()
			local created = assert(book:create(account(), now));
			local key = helpers.only_key_for(store.data, created.id);
			local listed = assert(book:listed(key, now));
			assert.equal(created.id, listed.id);
			assert.equal(key, listed.token); -- the handle: the token's SHA-256
			assert.is_nil(listed.uri);
			assert.is_nil(book:listed("not-a-key", now));
		end);

		it("should list a sealed invite with its token, link and landing page", function ()
			local key_file = os.tmpname();
			os.remove(key_file);
			local sealed = core.new({ host = "example.com", invites = store, names = names,
				token_storage = "sealed", key_file = key_file });
			local created, draft = assert(sealed:prepare(account(), now));
			-- What invite-created handlers do between prepare and store:
			created.landing_page = "https://example.com/i?"..created.token;
			created.additional_data = { note = "from a handler" };
			assert.is_nil(next(store.data)); -- nothing stored before store()
			assert(sealed:store(draft, created));
			assert.is_nil(helpers.dump(store.data):find(created.token, 1, true));
			local key = helpers.only_key_for(store.data, created.id);
			local listed = assert(sealed:listed(key, now));
			assert.equal(created.token, listed.token);
			assert.equal(created.uri, listed.uri);
			assert.equal("https://example.com/i?"..created.token, listed.landing_page);
			-- Without the link (the admin's list): nothing opened, nothing of the token.
			local plain = assert(sealed:listed(key, now, false));
			assert.equal(created.id, plain.id);
			assert.is_nil(plain.token);
			assert.is_nil(plain.uri);
			assert.is_nil(plain.landing_page);
			helpers.raises(function () sealed:listed(key, now, "no"); end,
				"bad argument #3 to 'listed' (boolean or nil expected, got string)");
			assert.equal("from a handler", listed.additional_data.note);
			-- Without the key (hash-only book on the same store): the handle, no link.
			local relisted = assert(book:listed(key, now));
			assert.equal(key, relisted.token);
			assert.is_nil(relisted.landing_page);
			os.remove(key_file);
		end);

		it("should store a draft once, with what handlers changed, even after they waited", function ()
			local co = coroutine.create(function ()
				local invite, draft = assert(book:prepare(account(), now));
				coroutine.yield(); -- a handler waiting on I/O (util.async)
				invite.additional_data = { groups = { "default" } };
				return book:store(draft, invite), draft, invite;
			end);
			assert(coroutine.resume(co));
			assert.is_nil(next(store.data));
			local ok, stored, draft, invite = coroutine.resume(co);
			assert(ok and stored);
			local key = helpers.only_key_for(store.data, invite.id);
			assert.same({ groups = { "default" } }, assert(book:listed(key, now)).additional_data);
			helpers.raises(function () book:store(draft, invite); end,
				"bad argument #1 to 'store' (a draft that was stored already)");
			helpers.raises(function () book:store({}, invite); end,
				"bad argument #1 to 'store' (draft from prepare expected, got table)");
		end);
	end);

	describe("#import_legacy()", function ()
		it("should import a Prosody invite under its hash", function ()
			local legacy = { type = "register", jid = "example.com", allow_registration = true,
				created_at = now - 10, expires = now + 10, token = "LegacyToken12345" };
			assert.is_true(book:import_legacy("LegacyToken12345", legacy, nil, now));
			assert.is_false(book:import_legacy("LegacyToken12345", legacy, nil, now));
			assert(book:get("LegacyToken12345", nil, "example.com", now));
			assert.is_nil(helpers.dump(store.data):find("LegacyToken12345", 1, true));
		end);
	end);
end);
