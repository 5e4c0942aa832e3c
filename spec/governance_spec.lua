-- Invite governance (lua/mod_invites/governance.lib.lua) in mod_invites, loaded into a fake
-- module over the real core: who counts as an invite's creator, which rule a role gets,
-- the quota's charge given back when storing fails, and the
-- inviter's message. The integration suite runs the same in a real Prosody.

local helpers = require "spec.helpers";

local existing_users = helpers.fake_prosody_core();
local admins = {};
package.loaded["core.usermanager"].is_admin = function (jid) return admins[jid] == true; end;

local function load(options)
	return helpers.load_shim("invites", "example.com", options);
end

describe("mod_invites governance", function ()
	before_each(function ()
		for name in pairs(existing_users) do existing_users[name] = nil; end
		for jid in pairs(admins) do admins[jid] = nil; end
		existing_users.alice, existing_users.boss = true, true;
		admins["boss@example.com"] = true;
	end);

	it("should name the creator: a contact invite's user, or the local account in additional_data.source", function ()
		local invites = load();
		assert.equal("alice", invites.create_contact("alice").creator);
		local made = invites.create_account(nil, { source = "boss@example.com/phone" });
		assert.same({ "boss", "boss@example.com/phone" }, { made.creator, made.source });
		made = invites.create_account(nil, { source = "stranger@elsewhere.example/x" });
		assert.same({ nil, "stranger@elsewhere.example/x" }, { made.creator, made.source });
	end);

	it("should keep a long source or note whole up to a character", function ()
		local invites = load();
		local source = "alice@example.com/x"..("é"):rep(200); -- 2 bytes each: the cut falls inside one
		local made = invites.create_account(nil, { source = source, note = ("ü"):rep(600) });
		assert.equal(255, #made.source);
		assert.equal(1024, #made.note);
		assert.equal(source:sub(1, 255), made.source);
	end);

	it("should apply the role's quota, prosody:registered's to other roles, and none to admins", function ()
		local invites, m = load({ invite_quota = { ["prosody:registered"] = { 2, "1 day" } } });
		assert.truthy(invites.create_contact("alice"));
		assert.truthy(invites.create_contact("alice"));
		local none, err, retry_at = invites.create_contact("alice");
		assert.same({ nil, "quota-exceeded" }, { none, err });
		assert.is_true(retry_at > os.time());
		assert.equal(1, m.metrics.refused["quota-exceeded"]);
		for _ = 1, 3 do assert.truthy(invites.create_contact("boss")); end
	end);

	it("should limit admins when their role is named", function ()
		local invites = load({ invite_quota = { ["prosody:admin"] = { 1, "1 day" } } });
		assert.truthy(invites.create_contact("boss"));
		assert.same({ nil, "quota-exceeded" }, { (select(1, invites.create_contact("boss"))), (select(2, invites.create_contact("boss"))) });
		-- prosody:registered has no entry: alice is not limited.
		for _ = 1, 3 do assert.truthy(invites.create_contact("alice")); end
	end);

	it("should give the charge back when the invite cannot be stored", function ()
		local invites, m = load({ invite_quota = { ["prosody:registered"] = { 1, "1 day" } } });
		local store = m:open_store("invites");
		local set = store.set;
		store.set = function () return nil, "disk full"; end;
		assert.same({ nil, "internal-server-error" }, { invites.create_contact("alice") });
		store.set = set;
		assert.truthy(invites.create_contact("alice"));
	end);

	it("should tell the inviter of a sign-up only with invite_notify_inviter", function ()
		for _, notify in ipairs({ false, true }) do
			local invites, m = load({ invite_notify_inviter = notify });
			local invite = invites.create_contact("alice", true);
			local valid = invites.get(invite.token);
			assert.truthy(valid:reserve("bob", "example.com"));
			existing_users.bob = true;
			assert.truthy(valid:confirm("bob", "example.com"));
			local told = {};
			for _, stanza in ipairs(m.sent) do
				if stanza.name == "message" then table.insert(told, stanza); end
			end
			assert.equal(notify and 1 or 0, #told);
			if notify then
				assert.equal("alice@example.com", told[1].attr.to);
				assert.equal("bob@example.com has signed up with your invitation.", told[1]:get_child_text("body"));
			end
			existing_users.bob = nil;
		end
	end);
end);
