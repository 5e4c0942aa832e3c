-- TEST STAND-IN for mod_groups_internal (the group store of Prosody's development branch;
-- neither Debian's Prosody 0.12 nor 13.0 ships it). mod_invites_register adds a new account
-- to the groups its invite names through add_member(group_id, username); this records the
-- calls in the store "group_members" (group id -> set of usernames), which the tests read
-- through mod_invites_testhook's group_members(). Nothing here is part of the product.

local members = module:open_store("group_members");

function add_member(group_id, username)
	local set = members:get(group_id) or {};
	set[username] = true;
	return members:set(group_id, set);
end
