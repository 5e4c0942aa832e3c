-- The request both benchmark plugins answer: <ELEMENT xmlns=XMLNS op='name' .../> in an
-- iq-set from an authenticated c2s session runs ops[name](attributes) and replies with its
-- result as JSON in <result xmlns=XMLNS/>. A failing op is an error stanza and one log line.
local st = require "util.stanza";
local json = require "util.json";

return function (module, xmlns, element, ops)
	local function handle(event)
		local origin, stanza = event.origin, event.stanza;
		if origin.type ~= "c2s" then
			origin.send(st.error_reply(stanza, "auth", "forbidden", "authenticated c2s only"));
			return true;
		end
		local req = stanza.tags[1];
		local op = ops[req.attr.op];
		if not op then
			origin.send(st.error_reply(stanza, "modify", "bad-request", "unknown op "..tostring(req.attr.op)));
			return true;
		end
		local ok, res = pcall(op, req.attr);
		if not ok then
			module:log("error", "%s op %s failed: %s", element, tostring(req.attr.op), tostring(res));
			origin.send(st.error_reply(stanza, "wait", "internal-server-error", tostring(res)));
			return true;
		end
		origin.send(st.reply(stanza):text_tag("result", json.encode(res), { xmlns = xmlns }));
		return true;
	end
	module:hook("iq-set/host/"..xmlns..":"..element, handle);
	module:hook("iq-set/self/"..xmlns..":"..element, handle);
end
