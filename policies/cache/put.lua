-- Stores one cache entry and keeps the policy's cache bounded.
-- KEYS[1] the entry, KEYS[2] the index (zset: entry key -> expiry in ms), KEYS[3] sizes (hash: entry key ->
-- bytes), KEYS[4] the total bytes. ARGV: the entry's bytes, ttl in ms, max entries, max bytes.
-- Returns {entries, bytes} after the put.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])

local function forget(k)
  local s = tonumber(redis.call('HGET', KEYS[3], k) or '0')
  redis.call('HDEL', KEYS[3], k)
  redis.call('ZREM', KEYS[2], k)
  if s > 0 then redis.call('DECRBY', KEYS[4], s) end
end

-- entries whose TTL ended (Redis dropped them) leave the index, a hundred at a time
for _, k in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 100)) do forget(k) end
forget(KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
redis.call('ZADD', KEYS[2], now + ttl, KEYS[1])
redis.call('HSET', KEYS[3], KEYS[1], #ARGV[1])
local total = redis.call('INCRBY', KEYS[4], #ARGV[1])
local n = redis.call('ZCARD', KEYS[2])
-- over a bound: the entries that expire first go first
while n > tonumber(ARGV[3]) or total > tonumber(ARGV[4]) do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
  if not oldest then break end
  forget(oldest)
  redis.call('DEL', oldest)
  n = n - 1
  total = tonumber(redis.call('GET', KEYS[4]) or '0')
end
-- the bookkeeping lives no longer than the last entry
redis.call('PEXPIRE', KEYS[2], ttl + 1000)
redis.call('PEXPIRE', KEYS[3], ttl + 1000)
redis.call('PEXPIRE', KEYS[4], ttl + 1000)
return {n, total}
