-- TEST STAND-IN for mod_password_policy (a prosody-modules community module).
--
-- Prosody's mod_invites_register_web does module:depends("password_policy"). Debian's
-- prosody-modules for Prosody 0.12 (bookworm) does not ship mod_password_policy, so under
-- 0.12 the web registration tests load this minimal replacement from
-- spec/integration/plugins-0.12 (the harness adds that folder to plugin_paths under 0.12
-- only). Under Prosody 13 the real module from bookworm-backports' prosody-modules is used.
-- It provides only what mod_invites_register_web calls:
--   get_policy()                          -> { length = N }   (used for the form's minlength)
--   check_password(password, { username }) -> true | nil, message, policy_name
-- with the community module's defaults: at least 8 characters, and the password must not
-- contain the username. Nothing here is part of the product.

local options = module:get_option("password_policy", {});
local length = options.length or 8;
local policy = { length = length; exclude_username = options.exclude_username ~= false };

function get_policy()
	return policy;
end

function check_password(password, additional_info)
	if not password or password == "" then
		return nil, "No password provided", "no-password";
	end
	if #password < length then
		return nil, ("Password is too short (minimum %d characters)"):format(length), "length";
	end
	local username = additional_info and additional_info.username;
	if policy.exclude_username and username and password:lower():find(username:lower(), 1, true) then
		return nil, "Password must not include your username", "username";
	end
	return true;
end
