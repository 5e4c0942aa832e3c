-- Migration from Prosody's own mod_invites, loaded with module:require("migration").
--
-- Prosody's store "invite_token" keeps plaintext tokens: account invites in one host-wide
-- record (token → invite), contact invites per inviter (token → expiry). Pending ones are
-- imported under their hash (sealed, where tokens are), so links handed out before the
-- switch keep working; every entry that was imported (or had expired, or can never be
-- used) is then removed.
--
-- Returns function (get_book) that migrates this host's store; it raises on a storage
-- failure it cannot say more about (the caller logs it).

local jid_split = require "util.jid".split;

return function (get_book)
	local legacy = module:open_store("invite_token");
	local now = os.time();
	local imported, failed = 0, 0;

	-- Returns false when the entry should stay for the next start (a storage failure);
	-- an entry that can never be imported (no usable token) is dropped, once, with a warning.
	local function import(token, invite, inviter)
		local ok, err = get_book():import_legacy(token, {
			type = invite.type;
			jid = invite.jid;
			allow_registration = not not invite.allow_registration;
			additional_data = type(invite.additional_data) == "table" and invite.additional_data or nil;
			created_at = math.floor(invite.created_at);
			expires = math.floor(invite.expires);
			reusable = not not invite.reusable;
			landing_page = type(invite.landing_page) == "string" and invite.landing_page or nil;
		}, inviter, now);
		if ok == nil and err == "internal-server-error" then
			failed = failed + 1;
			module:log("warn", "Could not import an invite of mod_invites: %s", err);
			return false;
		elseif ok == nil then
			module:log("warn", "Dropped an invite of mod_invites that cannot be used (%s)", err);
		elseif ok then
			imported = imported + 1;
		end
		return true;
	end

	local function valid_legacy(invite)
		return type(invite) == "table" and type(invite.jid) == "string"
			and (invite.type == "register" or invite.type == "roster")
			and type(invite.expires) == "number" and type(invite.created_at) == "number";
	end

	local host_invites = legacy:get(nil);
	if type(host_invites) == "table" then
		local remaining = {};
		for token, invite in pairs(host_invites) do
			if type(token) == "string" and valid_legacy(invite) then
				local inviter = invite.type == "roster" and jid_split(invite.jid) or nil;
				if not import(token, invite, inviter) then
					remaining[token] = invite;
				end
			end
		end
		legacy:set(nil, next(remaining) and remaining or nil);
	end

	for username in legacy:users() do
		if username and username ~= "" then
			local contact_invites = legacy:get(username);
			local remaining = {};
			for token, expires in pairs(contact_invites or {}) do
				if type(token) == "string" and type(expires) == "number" then
					local invite = {
						type = "roster";
						jid = username.."@"..module.host;
						allow_registration = false;
						created_at = now;
						expires = math.floor(expires);
					};
					if not import(token, invite, username) then
						remaining[token] = expires;
					end
				end
			end
			legacy:set(username, next(remaining) and remaining or nil);
		end
	end

	if imported > 0 or failed > 0 then
		module:log("info", "Imported %d pending invites from mod_invites (%d failed, kept for the next start)", imported, failed);
	end
end
