-- mod_invites_adhoc, loaded into a fake module environment over a stand-in store: who may
-- invite new users on each Prosody version, and what the commands answer. (The integration
-- specs run it in a real Prosody: test_suite_adhoc.py, test_adhoc_0401.py.)

local helpers = require "spec.helpers";
local jid_bare = require "util.jid".bare;
local st = require "util.stanza";

local accounts, roles = {}, {};
local usermanager = {
	user_exists = function (username) return accounts[username] == true; end;
	get_roles = function (jid) return roles[jid_bare(jid)]; end;
};
package.loaded["core.usermanager"] = usermanager;

-- The store: records each call, answers with `refusal` (nil, err) when set.
local calls, refusal = {}, nil;
local function creator(name)
	return function (...)
		table.insert(calls, { name, ... });
		if refusal then return nil, refusal; end
		return { token = "SECRET", uri = "xmpp:example.com?register;preauth=SECRET", expires = 86400 };
	end;
end
local store = {
	create_contact = creator("create_contact");
	create_account = creator("create_account");
	create_account_reset = creator("create_account_reset");
	is_username_reserved = function (username) return username == "held"; end;
};

-- Loads the module as Prosody 13 (`version` 13) or 0.12 does; `may` answers module:may.
local function load(version, options, may)
	usermanager.set_user_role = version == 13 and function () end or nil;
	local m = helpers.fake_module("invites_adhoc", "example.com", options);
	m.commands, m.permissions = {}, {};
	function m.require(_, lib)
		assert.equal("adhoc", lib);
		return { new = function (name, node, handler, permission)
			return { name = name, node = node, handler = handler, permission = permission };
		end };
	end
	function m.provides(_, kind, item)
		assert.equal("adhoc", kind);
		m.commands[item.node] = item;
	end
	function m.depends(_, dep)
		return dep == "invites" and store or nil;
	end
	function m.default_permission(_, role, permission) m.permissions[permission] = role; end
	function m.may(_, permission, data)
		assert.equal(":invite-users", permission);
		return may(data);
	end
	local env = setmetatable({ module = m; prosody = { process_type = "prosody" } }, { __index = _G });
	assert(loadfile(helpers.repo.."/lua/mod_invites_adhoc/mod_invites_adhoc.lua", "t", env))();
	return m;
end

-- Runs a command as `from`, with a submitted form of `values` if given.
local function run(m, node, from, values)
	local form;
	if values then
		form = st.stanza("x", { xmlns = "jabber:x:data", type = "submit" });
		for var, value in pairs(values) do
			form:tag("field", { var = var }):text_tag("value", value):up();
		end
	end
	local command = m.commands[node];
	return command:handler({ from = from; to = "example.com"; action = "execute"; form = form });
end

-- The values of a result form, by var, and its FORM_TYPE field's type.
local function fields_of(answer)
	local x = answer.result.layout:form(answer.result.values, "result");
	assert.equal("result", x.attr.type);
	local values, types = {}, {};
	for field in x:childtags("field") do
		values[field.attr.var] = field:get_child_text("value") or false;
		types[field.attr.var] = field.attr.type;
	end
	return values, types;
end

local function allows_registration(m, from)
	calls = {};
	run(m, "urn:xmpp:invite#invite", from);
	return calls[1][3];
end

describe("mod_invites_adhoc", function ()
	before_each(function ()
		calls, refusal = {}, nil;
		accounts, roles = { juliet = true }, {};
	end);

	describe("on Prosody 0.12", function ()
		it("should let admins, then allowed roles invite new users, and others as allow_user_invites says", function ()
			local m = load(12, {
				allow_user_invites_by_roles = { "trusted" };
				deny_user_invites_by_roles = { "probation" };
				allow_user_invites = true;
			});
			roles["admin@example.com"] = { ["prosody:admin"] = true; probation = true };
			roles["t@example.com"] = { trusted = true; probation = true };
			roles["p@example.com"] = { probation = true };
			roles["u@example.com"] = {};
			assert.is_true(allows_registration(m, "admin@example.com/r"));
			assert.is_true(allows_registration(m, "t@example.com/r"));
			assert.is_false(allows_registration(m, "p@example.com/r"));
			assert.is_true(allows_registration(m, "u@example.com/r"));
			assert.is_true(allows_registration(m, "noroles@example.com/r"));
			assert.is_false(allows_registration(load(12, {}), "u@example.com/r"));
		end);

		it("should offer the two commands of Prosody 0.12's module, with its permissions", function ()
			local m = load(12, {});
			assert.same({ "urn:xmpp:invite#create-account", "urn:xmpp:invite#invite" }, helpers.keys(m.commands));
			assert.equal("local_user", m.commands["urn:xmpp:invite#invite"].permission);
			assert.equal("admin", m.commands["urn:xmpp:invite#create-account"].permission);
			assert.equal("admin", load(12, { allow_contact_invites = false }).commands["urn:xmpp:invite#invite"].permission);
			assert.same({}, m.permissions);
		end);
	end);

	describe("on Prosody 13", function ()
		it("should leave it to the :invite-users permission, given to registered users by allow_user_invites", function ()
			local m = load(13, {}, function (data) return data.from == "yes@example.com/r"; end);
			assert.equal("prosody:admin", m.permissions[":invite-users"]);
			assert.is_true(allows_registration(m, "yes@example.com/r"));
			assert.is_false(allows_registration(m, "no@example.com/r"));
			assert.equal("prosody:registered", load(13, { allow_user_invites = true }).permissions[":invite-users"]);
		end);

		it("should also offer a password reset for accounts of this host only", function ()
			local m = load(13, {});
			local node = "xmpp:prosody.im/mod_invites_adhoc#password-reset";
			assert.same({ "urn:xmpp:invite#create-account", "urn:xmpp:invite#invite", node }, helpers.keys(m.commands));
			assert.equal("admin", m.commands[node].permission);
			for _, jid in ipairs({ "example.com", "romeo@example.com", "juliet@elsewhere.example" }) do
				local answer = run(m, node, "admin@example.com/r", { accountjid = jid });
				assert.same({ message = "There is no such account on this server" }, answer.error);
			end
			assert.same({}, calls);
			assert.truthy(run(m, node, "admin@example.com/r", { accountjid = "juliet@example.com" }).result);
			assert.same({ { "create_account_reset", "juliet" } }, calls);
		end);
	end);

	for _, version in ipairs({ 12, 13 }) do
		describe("on "..version, function ()
			it("should answer with XEP-0401's FORM_TYPE, uri, landing-url and expire", function ()
				local values, types = fields_of(run(load(version, {}), "urn:xmpp:invite#create-account", "admin@example.com/r"));
				assert.same({
					FORM_TYPE = "urn:xmpp:invite#invitation";
					uri = "xmpp:example.com?register;preauth=SECRET";
					["landing-url"] = false;
					expire = "1970-01-02T00:00:00Z";
				}, values);
				assert.equal("hidden", types.FORM_TYPE);
				assert.same({ { "create_account", nil, { source = "admin@example.com/r" } } }, calls);
			end);

			it("should turn a refusal from the store into an error note and one log line without the invite", function ()
				local m = load(version, {}, function () return true; end);
				refusal = "internal-server-error";
				local answer = run(m, "urn:xmpp:invite#invite", "romeo@example.com/r");
				assert.same({ status = "completed"; error = { message = "The invitation could not be created, please try again later" } }, answer);
				assert.same({ { "info", "No contact invite for romeo@example.com: internal-server-error" } }, m.logs);
			end);

			it("should make contact invites for users of this host only", function ()
				local answer = run(load(version, {}, function () return true; end), "urn:xmpp:invite#invite", "romeo@elsewhere.example/r");
				assert.same({ message = "This command is only available to users of example.com" }, answer.error);
				assert.same({}, calls);
			end);

			it("should bind an account invite to a submitted username, if it is free", function ()
				local m = load(version, {});
				assert.truthy(run(m, "urn:xmpp:invite#create-account", "admin@example.com/r", { username = "Romeo" }).result);
				assert.same({ { "create_account", "romeo", { source = "admin@example.com/r" } } }, calls);
				local refusals = {
					juliet = "That username is already taken";
					held = "That username is reserved by another invitation";
					["a@b"] = "That username is not valid";
				};
				for username, text in pairs(refusals) do
					local answer = run(m, "urn:xmpp:invite#create-account", "admin@example.com/r", { username = username });
					assert.same({ message = text }, answer.error);
				end
				local answer = run(m, "urn:xmpp:invite#create-account", "admin@example.com/r", { ["roster-subscription"] = "true" });
				assert.truthy(answer.result);
				assert.same({ "create_account", nil, { source = "admin@example.com/r", roster_subscription = true } }, calls[2]);
			end);

			it("should ask for the username first only with invites_adhoc_account_form", function ()
				local asked, state = run(load(version, { invites_adhoc_account_form = true }), "urn:xmpp:invite#create-account", "admin@example.com/r");
				assert.equal("executing", asked.status);
				assert.equal("executing", state);
				assert.equal("username", asked.form[1].name);
				assert.same({}, calls);
			end);
		end);
	end
end);
