-- mod_invites_adhoc: XEP-0401 ad-hoc commands that create invites in mod_invites.
--
-- A drop-in for Prosody's own mod_invites_adhoc: the same commands, options and access
-- rules on 0.12 and 13. It also answers as XEP-0401 0.6 asks: results carry the hidden
-- FORM_TYPE urn:xmpp:invite#invitation, and create-account takes a `username` the invite
-- is then bound to. An invite the store refuses becomes an error note, not a traceback.

local adhocutil = require "util.adhoc";
local dataforms = require "util.dataforms";
local datetime = require "util.datetime";
local jid_bare = require "util.jid".bare;
local jid_split = require "util.jid".split;
local nodeprep = require "util.encodings".stringprep.nodeprep;
local usermanager = require "core.usermanager";

local new_adhoc = module:require("adhoc").new;

-- Whether local users can invite other users to create an account on this server
local allow_user_invites = module:get_option_boolean("allow_user_invites", false);
-- Who can see and use the contact invite command. It is strongly recommended to
-- keep this available to all local users. To allow/disallow invite-registration
-- on the server, use the option above instead.
local allow_contact_invites = module:get_option_boolean("allow_contact_invites", true);
-- Extension: create-account asks for its options first (XEP-0401 0.6) instead of creating
-- an invite for any username at once, as Prosody's does.
local ask_account_options = module:get_option_boolean("invites_adhoc_account_form", false);

-- COMPAT: Prosody 13 decides who may invite new users with a permission (":invite-users",
-- given to prosody:registered by allow_user_invites, else to admins) and also offers a
-- password reset command. 0.12 decides with roles: admins always, then the roles in
-- allow_user_invites_by_roles, then those in deny_user_invites_by_roles, else
-- allow_user_invites. (0.12 sent its results as a "form", 13 as a "result": we send a
-- "result" on both, as XEP-0050 and XEP-0401 ask.)
local has_role_api = usermanager.set_user_role ~= nil;
local offers_password_reset = has_role_api;

local may_invite_new_users;
if has_role_api then
	module:default_permission(allow_user_invites and "prosody:registered" or "prosody:admin", ":invite-users");
	function may_invite_new_users(data)
		return module:may(":invite-users", data);
	end
else
	local allow_user_invite_roles = module:get_option_set("allow_user_invites_by_roles");
	local deny_user_invite_roles = module:get_option_set("deny_user_invites_by_roles");
	function may_invite_new_users(data)
		local roles = usermanager.get_roles(data.from, module.host);
		if not roles then
			return allow_user_invites;
		elseif roles["prosody:admin"] then
			return true;
		end
		if allow_user_invite_roles then
			for role in allow_user_invite_roles do
				if roles[role] then return true; end
			end
		end
		if deny_user_invite_roles then
			for role in deny_user_invite_roles do
				if roles[role] then return false; end
			end
		end
		return allow_user_invites;
	end
end

local invites;
if prosody.process_type == "prosody" then
	invites = module:depends("invites");
end

module:depends("adhoc");

local invite_result_form = dataforms.new({
	title = "Your invite has been created";
	{
		name = "FORM_TYPE";
		type = "hidden";
		value = "urn:xmpp:invite#invitation";
	};
	{
		name = "url";
		var = "landing-url";
		label = "Invite web page";
		desc = "Share this link";
	};
	{
		name = "uri";
		label = "Invite URI";
		desc = "This alternative link can be opened with some XMPP clients";
	};
	{
		name = "expire";
		label = "Invite valid until";
	};
});

-- Why no invite was made, as the requester reads it.
local refusal_texts = {
	["internal-server-error"] = "The invitation could not be created, please try again later";
	["username-invalid"] = "That username is not valid";
	["username-taken"] = "That username is already taken";
	["username-reserved"] = "That username is reserved by another invitation";
	["account-not-found"] = "There is no such account on this server";
	-- invite_quota and invite_wait_after_registration (mod_invites); %s: when it may be
	-- tried again (a quota of 0 never allows one: the text without a time).
	["quota-exceeded"] = "You have created as many invitations as you may for now; you can create another after %s";
	["quota-exceeded/never"] = "Your account may not create invitations";
	["too-soon"] = "New accounts cannot create invitations yet; you can create one after %s";
};

-- The command's answer to create_*(…)'s `invite` or `nil, err`. A refusal is logged once,
-- without anything of the invite.
local function invite_result(data, what, invite, err, retry_at)
	if not invite then
		module:log("info", "No %s for %s: %s", what, jid_bare(data.from), tostring(err));
		local text = refusal_texts[err] or "The invitation could not be created";
		if text:find("%s", 1, true) then
			if type(retry_at) == "number" then
				text = text:format(os.date("!%Y-%m-%d %H:%M:%S", retry_at).." UTC");
			else
				text = refusal_texts[err.."/never"] or text:format("a while");
			end
		end
		return {
			status = "completed";
			error = { message = text };
		};
	end
	return {
		status = "completed";
		result = {
			layout = invite_result_form;
			values = {
				uri = invite.uri;
				url = invite.landing_page;
				expire = invite.expires and datetime.datetime(invite.expires);
			};
		};
	};
end

local function form_error()
	return { status = "completed"; error = { message = "Fill in the form correctly" } };
end

-- This command is available to all local users, even if allow_user_invites = false
-- If allow_user_invites is false, creating an invite still works, but the invite will
-- not be valid for registration on the current server, only for establishing a roster
-- subscription.
module:provides("adhoc", new_adhoc("Create new contact invite", "urn:xmpp:invite#invite",
	function (_, data)
		local username, host = jid_split(data.from);
		if host ~= module.host then
			return {
				status = "completed";
				error = {
					message = "This command is only available to users of "..module.host;
				};
			};
		end
		return invite_result(data, "contact invite", invites.create_contact(username, may_invite_new_users(data), {
			source = data.from;
		}));
	end, allow_contact_invites and "local_user" or "admin"));

-- What create-account offers (with invites_adhoc_account_form), and what it reads from a
-- submitted form (XEP-0401 0.6): a username the invite is bound to, and whether the new
-- account and the admin become mutual contacts (mod_invites_register subscribes them: the
-- invite's creator is the admin's account).
local account_form = dataforms.new({
	title = "Create new account invite";
	{
		name = "username";
		type = "text-single";
		label = "Username";
		desc = "Leave empty to let the invitee choose one";
	};
	{
		name = "roster-subscription";
		type = "boolean";
		label = "Add the new account to my contacts";
		value = false;
	};
});
local account_submission = dataforms.new({
	{ name = "username"; type = "text-single"; };
	{ name = "roster-subscription"; type = "boolean"; };
});

-- Why `username` (nodeprepped) cannot be given to an account invite, if it cannot.
local function unavailable(username)
	if not username or username == "" then
		return "username-invalid";
	elseif usermanager.user_exists(username, module.host) then
		return "username-taken";
	end
	local reserved, err = invites.is_username_reserved(username);
	if reserved == nil then
		return err;
	end
	return reserved and "username-reserved" or nil;
end

local function create_account_invite(data, fields)
	local username = fields.username;
	if username == "" then
		username = nil;
	elseif username then
		username = nodeprep(username);
		local why = unavailable(username);
		if why then
			return invite_result(data, "account invite", nil, why);
		end
	end
	return invite_result(data, "account invite", invites.create_account(username, {
		source = data.from;
		roster_subscription = fields["roster-subscription"] or nil;
	}));
end

-- This is an admin-only command that creates a new invitation suitable for registering
-- a new account. It does not add the new user to the admin's roster.
module:provides("adhoc", new_adhoc("Create new account invite", "urn:xmpp:invite#create-account",
	function (_, data, state)
		if data.action == "cancel" then
			return { status = "canceled" };
		elseif data.form then -- submitted, also with the first request
			local fields, err = account_submission:data(data.form);
			if err then return form_error(); end
			return create_account_invite(data, fields);
		elseif ask_account_options and not state then
			return { status = "executing"; actions = { "complete"; default = "complete" }; form = account_form },
				"executing";
		end
		return create_account_invite(data, {});
	end, "admin"));

if offers_password_reset then
	local password_reset_form = dataforms.new({
		title = "Generate Password Reset Invite";
		{
			name = "accountjid";
			type = "jid-single";
			required = true;
			label = "The XMPP ID for the account to generate a password reset invite for";
		};
	});

	module:provides("adhoc", new_adhoc("Create password reset invite", "xmpp:prosody.im/mod_invites_adhoc#password-reset",
		adhocutil.new_simple_form(password_reset_form, function (fields, err, data)
			if err then return form_error(); end
			local username, host = jid_split(fields.accountjid);
			if host ~= module.host or not username or not usermanager.user_exists(username, host) then
				return invite_result(data, "password reset invite", nil, "account-not-found");
			end
			return invite_result(data, "password reset invite", invites.create_account_reset(username));
		end), "admin"));
end
