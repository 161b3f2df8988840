-- The leader's upstream call is over. KEYS[1] its lease, KEYS[2] its stream, KEYS[3] its replica's followed
-- set. ARGV[1] its token, ARGV[2] '1' when it published its answer to the stream, ARGV[3] the end marker
-- (done | failed | alone), ARGV[4] the model that answered, ARGV[5] how long the stream stays for late
-- readers (ms), ARGV[6] the stream's length bound.
-- Returns 1 when a follower joined since the leader last looked and nothing was published: the leader
-- publishes, then ends again. Otherwise ends the stream (when published), frees the lease, returns 0.
-- A lease no longer held by this token (it expired: held past the cap, or its renewals cut off) may be another
-- request's now, on this replica too: its mark in the followed set (named by the lease, not the token) and
-- the lease itself are left to that request; only this token's own stream gets the end marker.
local ours = redis.call('GET', KEYS[1]) == ARGV[1]
if ours and ARGV[2] == '0' and redis.call('SREM', KEYS[3], KEYS[1]) == 1 then return 1 end
if ARGV[2] == '1' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'e', ARGV[3], 'm', ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end
if ours then
  redis.call('SREM', KEYS[3], KEYS[1])
  redis.call('DEL', KEYS[1])
end
return 0
