-- luacheck configuration (`make lint`), in the style of Prosody's own .luacheckrc: plugins
-- read Prosody's module API as globals; specs get busted's. No warning is ignored wholesale:
-- a module's exports are listed by name, file by file.

codes = true
-- Our shims run on whichever Lua Prosody runs on (5.1 to 5.4, LuaJIT; see LUA_VERSION in
-- the Makefile), so the standard globals are those of any of them (e.g. `table.unpack or
-- unpack`).
std = "max"
max_line_length = 150
exclude_files = { "build/**", "target/**", "fuzz/target/**" }

read_globals = {
	"prosody",
};

-- Prosody's module API, as Prosody's .luacheckrc lists it for its plugins/ (0.12 and 13).
local module_api = {
	-- Module instance
	"module.name",
	"module.host",
	"module._log",
	"module.event_handlers",
	"module.reloading",
	"module.saved_state",
	"module.global",
	"module.path",
	"module.items",

	-- Module API
	"module.add_extension",
	"module.add_feature",
	"module.add_identity",
	"module.add_item",
	"module.add_timer",
	"module.weekly",
	"module.daily",
	"module.hourly",
	"module.broadcast",
	"module.context",
	"module.could",
	"module.default_permission",
	"module.default_permissions",
	"module.depends",
	"module.fire_event",
	"module.get_directory",
	"module.get_host",
	"module.get_host_items",
	"module.get_host_type",
	"module.get_name",
	"module.get_option",
	"module.get_option_array",
	"module.get_option_boolean",
	"module.get_option_enum",
	"module.get_option_inherited_set",
	"module.get_option_integer",
	"module.get_option_number",
	"module.get_option_path",
	"module.get_option_period",
	"module.get_option_scalar",
	"module.get_option_set",
	"module.get_option_string",
	"module.get_status",
	"module.handle_items",
	"module.hook",
	"module.hook_global",
	"module.hook_object_event",
	"module.hook_tag",
	"module.load_resource",
	"module.log",
	"module.log_status",
	"module.may",
	"module.measure",
	"module.metric",
	"module.on_ready",
	"module.open_store",
	"module.provides",
	"module.remove_item",
	"module.require",
	"module.send",
	"module.send_iq",
	"module.set_global",
	"module.set_status",
	"module.shared",
	"module.unhook",
	"module.unhook_object_event",
	"module.wrap_event",
	"module.wrap_global",
	"module.wrap_object_event",

	-- mod_http API
	"module.http_url",
};

-- Methods a plugin may set on its module.
local module_methods = {
	"module.ready",
	"module.unload",
	"module.add_host",
	"module.load",
	"module.save",
	"module.restore",
	"module.command",
	"module.environment",
};

local plugin = { read_globals = module_api, globals = module_methods };

-- Our modules. A plugin's globals are what it exports to module:depends(), so each one is
-- listed: mod_invites exports its documented API (README, "Lua API"), nothing else.
files["lua/"] = plugin;
local invites_api = {
	"create_account",
	"create_account_reset",
	"create_contact",
	"create_group",
	"get",
	"use",
	"pending_account_invites",
	"get_account_invite_info",
	"delete_account_invite",
	"is_username_reserved",
	"invited_by",
	"invitees",
	"guess_throttle",
	"prune",
};
-- prosodyctl points the globally loaded instance at the host a command names.
local invites_globals = { "module.host" };
for _, name in ipairs(invites_api) do table.insert(invites_globals, name); end
files["lua/mod_invites/mod_invites.lua"] = { globals = invites_globals };
-- Loaded with module:require, in mod_invites' environment: they see its API.
files["lua/mod_invites/**/*.lib.lua"] = { read_globals = invites_api };

-- busted specs and their helpers. A spec writes the messages it expects out whole, on one
-- line, so it can be found from the message: no line length limit there.
files["spec/"] = { std = "+busted" };
files["spec/*_spec.lua"] = { max_line_length = false };

-- Stand-in modules the integration tests and benchmarks load into Prosody (no busted there).
files["spec/integration/"] = { std = "max" };
files["spec/integration/plugins/"] = plugin;
files["spec/integration/plugins-0.12/"] = plugin;
files["bench/plugins/"] = plugin;
files["spec/integration/plugins/mod_groups_internal.lua"] = { globals = { "add_member" } };
files["spec/integration/plugins/mod_invites_testhook.lua"] = { globals = { "add_helpers" } };
files["spec/integration/plugins-0.12/mod_password_policy.lua"] = { globals = { "get_policy", "check_password" } };
