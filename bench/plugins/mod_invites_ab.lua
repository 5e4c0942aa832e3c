-- Interleaved A/B inside one Prosody: our get() of an unknown token against the bare
-- storage reads it rests on (keyval get) and that Prosody's own mod_invites makes (map get),
-- in rounds, so both see the same process, heap and database state. Used by
-- bench/ab_get_unknown.py; writes "AB ..." lines to the log.
local time = require "util.time";
local random = require "util.random";
local base64 = require "util.encodings".base64.encode;

local samples = module:get_option_number("invites_ab_samples", 2000);

local function median(xs)
	table.sort(xs);
	return xs[math.floor(#xs / 2) + 1];
end

local function unknown_token()
	return (base64(random.bytes(18)):gsub("+", "-"):gsub("/", "_"));
end

module:add_timer(0.5, function ()
	local invites = module:depends("invites");
	local map = module:open_store("invite_token", "map");
	local keyval = module:open_store("invites");
	local function round(label)
		local ours, stock, bare, shim = {}, {}, {}, {};
		for i = 1, samples do
			local token = unknown_token();
			local t0 = time.now(); invites.get(token); ours[i] = (time.now() - t0) * 1e6;
			local t1 = time.now(); map:get(nil, token); stock[i] = (time.now() - t1) * 1e6;
			local t2 = time.now(); keyval:get(("%064x"):format(i)); bare[i] = (time.now() - t2) * 1e6;
			-- a token of the wrong shape is refused before storage: the shim and core alone
			local t3 = time.now(); invites.get("!"); shim[i] = (time.now() - t3) * 1e6;
		end
		module:log("info", "AB %s ours_get_unknown_us=%.1f prosody_map_get_us=%.1f keyval_get_us=%.1f ours_without_storage_us=%.1f",
			label, median(ours), median(stock), median(bare), median(shim));
	end
	for r = 1, 3 do round("N=0 round "..r); end
	for _ = 1, 1000 do invites.create_account(); end
	for r = 1, 3 do round("N=1000 round "..r); end
	module:log("info", "AB done");
end);
