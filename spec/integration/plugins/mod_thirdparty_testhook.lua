-- TEST-ONLY module: never load this on a real server.
--
-- Helpers for spec/integration/test_third_party.py, added to mod_invites_testhook's (so
-- xmpp.call_hook() calls them as it calls the others):
--
--   tp_admin_token(username)        a Bearer token for mod_http_admin_api, made with
--                                   mod_tokenauth as the user's own (0.12: a JID token with
--                                   scope prosody:scope:admin; 13: a grant plus a token with
--                                   the user's primary role)
--   tp_group_create(id, name)       mod_groups_internal.create({ name = name }, false, id)
--   tp_group_members(id)            the group's members (sorted array of usernames), read
--                                   through mod_groups_internal.get_members()
--   tp_group_events()               every "group-user-added" event fired on this host since
--                                   start, in order: array of { id = group, user = username }
--   tp_store_get(store, key)        module:open_store(store):get(key) on this host (e.g. the
--                                   "invites_tracking" store of mod_invites_tracking)
--   tp_module_path(name)            where the module `name` was loaded from on this host
--
-- Works with Prosody 0.12 and 13.

local jid_join = require "util.jid".join;
local usermanager = require "core.usermanager";
local modulemanager = require "core.modulemanager";

local host = module.host;

local group_events = {};
module:hook("group-user-added", function (event)
	table.insert(group_events, { id = event.id, user = event.user });
end);

local function groups_module()
	local mod = modulemanager.get_module(host, "groups_internal");
	if not mod then error("mod_groups_internal is not loaded on "..host); end
	return mod;
end

local helpers = {};

function helpers.tp_admin_token(username)
	local tokens = module:depends("tokenauth");
	local user_jid = jid_join(username, host);
	if tokens.create_grant then -- Prosody 13
		local grant, err = tokens.create_grant(user_jid, user_jid, 3600, nil);
		if not grant then return nil, err; end
		local role = usermanager.get_user_role(username, host);
		if not role then return nil, "user has no role"; end
		return tokens.create_token(user_jid, grant, role.name, 3600, "test_third_party");
	end
	-- Prosody 0.12: mod_http_admin_api checks token_info.session.auth_scope
	return tokens.create_jid_token(user_jid, user_jid, "prosody:scope:admin", 3600);
end

function helpers.tp_group_create(group_id, name)
	return groups_module().create({ name = name }, false, group_id);
end

function helpers.tp_group_members(group_id)
	local members = groups_module().get_members(group_id);
	local list = {};
	for username in pairs(members or {}) do table.insert(list, username); end
	table.sort(list);
	return list, members == nil and "no such group" or nil;
end

function helpers.tp_group_events()
	return group_events;
end

function helpers.tp_store_get(store, key)
	return module:open_store(store):get(key);
end

function helpers.tp_module_path(name)
	local mod = modulemanager.get_module(host, name);
	return mod and mod.module and mod.module.path or nil;
end

module:depends("invites_testhook").add_helpers(helpers);
