-- Keeps a replica's leases (and the streams it publishes to) alive while their upstream calls run.
-- KEYS pairs: a lease, its stream. ARGV[1] the lease in ms, ARGV[2] the stream's TTL in ms, then each lease's
-- token in the same order. Returns the leases no longer held by that token (they expired: their followers
-- have moved on).
local lost = {}
for i = 1, #KEYS, 2 do
  local token = ARGV[2 + (i + 1) / 2]
  if redis.call('GET', KEYS[i]) == token then
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
    redis.call('PEXPIRE', KEYS[i + 1], ARGV[2])
  else
    table.insert(lost, KEYS[i])
  end
end
return lost
