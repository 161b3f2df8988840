-- A miss asks to lead the upstream call of its key on every replica (cache/coalesce_redis.py).
-- KEYS[1] the entry, KEYS[2] the key's lease. ARGV[1] this request's token (`{replica}:{n}`), ARGV[2] the
-- lease in ms, ARGV[3] the prefix of the replicas' followed sets, ARGV[4] their TTL in ms, ARGV[5] '1' to
-- look for the entry ('0' when the caller found one too old for its max-age), ARGV[6] '1' when the caller may
-- follow ('0': its replica follows as many keys as it may).
-- Returns {0} when the entry is there now (stored since the caller's GET), {1} when the caller holds the
-- lease (it leads), {2, holder} when another request holds it: the caller follows it, and the holder's
-- replica learns that its answer must be published: at once from a message on the channel named as its
-- followed set (which it subscribes to), and, should that be lost, from the set, which it pops.
-- {3} when another request holds it and the caller may not follow: it goes upstream on its own, and the holder
-- is told nothing (it publishes for nobody).
if ARGV[5] == '1' and redis.call('EXISTS', KEYS[1]) == 1 then return {0} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1} end
local holder = redis.call('GET', KEYS[2])
if not holder then return {0} end
local replica = string.match(holder, '^([^:]+):')
if not replica then return {0} end
if ARGV[6] == '0' then return {3} end
-- The set's name is made from the holder's token: one set per replica, which only that replica pops.
local followed = ARGV[3] .. replica
redis.call('SADD', followed, KEYS[2])
redis.call('PEXPIRE', followed, ARGV[4])
-- pcall: a user Redis allows no channels (Redis 7's default for a new ACL user) still follows, through the set.
redis.pcall('PUBLISH', followed, KEYS[2])
return {2, holder}
