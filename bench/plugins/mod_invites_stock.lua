-- BENCHMARK-ONLY module: never load this on a real server.
--
-- Prosody's own mod_invites under another name, so that it can run in the same process as
-- ours (which shadows the name "invites" on plugin_paths). Loads the file Prosody ships
-- (<prosody.paths.source>/modules/mod_invites.lua: /usr/lib/prosody/modules on Debian, the
-- extracted tree for a Prosody 13 run through PROSODY_BIN) into this module's environment, so
-- it is Prosody's code on this host's storage (its store "invite_token" of this host). Used by
-- bench/ab.py on a VirtualHost of its own; `invites_stock_file` names another file.

local default_file = prosody.paths.source.."/modules/mod_invites.lua";
local file = module:get_option_string("invites_stock_file", default_file);

-- COMPAT: Lua 5.1 / LuaJIT have no _ENV; the chunk's environment is set with setfenv.
local setfenv, getfenv = rawget(_G, "setfenv"), rawget(_G, "getfenv");
local env = _ENV or getfenv(1);
local chunk, err = loadfile(file, "t", env);
if not chunk then
	error("invites_stock: cannot load "..file..": "..tostring(err));
end
if setfenv then setfenv(chunk, env); end
chunk();
env.invites_stock_file = file;
module:log("info", "invites_stock: Prosody's mod_invites from %s", file);
