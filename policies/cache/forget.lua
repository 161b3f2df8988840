-- Deletes cache entries and their bookkeeping. KEYS[1] the index, KEYS[2] sizes, KEYS[3] the total bytes;
-- ARGV the entries' keys. Returns how many existed.
local gone = 0
for _, k in ipairs(ARGV) do
  gone = gone + redis.call('DEL', k)
  local s = tonumber(redis.call('HGET', KEYS[2], k) or '0')
  redis.call('HDEL', KEYS[2], k)
  redis.call('ZREM', KEYS[1], k)
  if s > 0 then redis.call('DECRBY', KEYS[3], s) end
end
return gone
