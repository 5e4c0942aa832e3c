-- TEST-ONLY module: never load this on a real server.
--
-- An `invite-created` handler that changes the invite, as third-party modules do (Prosody
-- fires the event before it stores the invite, so what handlers change is stored):
--   invite.additional_data.note = "from handler"   (additional_data created if nil)
--   invite.landing_page = "https://example.test/welcome/" .. invite.token
-- Used by test_api_compat.py.

module:hook("invite-created", function (invite)
	if invite.additional_data == nil then
		invite.additional_data = {};
	end
	invite.additional_data.note = "from handler";
	invite.landing_page = "https://example.test/welcome/"..invite.token;
end);
