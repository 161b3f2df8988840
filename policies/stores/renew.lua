-- Extend this replica's leases on its concurrency slots. KEYS[i]: a slot key; ARGV[1]: lease seconds;
-- ARGV[i + 1]: the lease id held in KEYS[i]. A lease that already expired is not brought back.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lease = tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', now + lease, ARGV[i + 1])
  redis.call('PEXPIRE', KEYS[i], math.ceil(lease * 1000))
end
return 1
