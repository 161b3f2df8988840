-- Return what a request reserved and charge what it used. One call per request.
-- KEYS[i]: settlement i's key. ARGV, six per settlement: kind (g|b|s), reserved, used, limit, param, lease id.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i = 1, #KEYS do
  local b = (i - 1) * 6
  local kind = ARGV[b + 1]
  if kind == 'g' then
    local tat = tonumber(redis.call('GET', KEYS[i]))
    if tat then
      local new = tat + (tonumber(ARGV[b + 3]) - tonumber(ARGV[b + 2])) * tonumber(ARGV[b + 5]) / tonumber(ARGV[b + 4])
      if new > now then
        redis.call('SET', KEYS[i], string.format('%.17g', new), 'PX', math.ceil((new - now) * 1000) + 1000)
      else
        redis.call('DEL', KEYS[i])
      end
    end
  elseif kind == 'b' then
    if redis.call('EXISTS', KEYS[i]) == 1 then
      redis.call('HINCRBY', KEYS[i], 'r', -tonumber(ARGV[b + 2]))
      redis.call('HINCRBY', KEYS[i], 'u', ARGV[b + 3])
    end
  else
    redis.call('ZREM', KEYS[i], ARGV[b + 6])
  end
end
return 1
