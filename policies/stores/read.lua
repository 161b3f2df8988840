-- What each claim's counter holds now, reserving nothing (the usage API).
-- KEYS[i]: the key. ARGV, three per claim: kind (g|b|s), limit, param. Returns {used, reserved} per claim.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {}
for i = 1, #KEYS do
  local b = (i - 1) * 3
  local kind = ARGV[b + 1]
  if kind == 'g' then
    local tat = tonumber(redis.call('GET', KEYS[i]) or 0)
    local used = 0
    if tat > now then used = math.ceil((tat - now) * tonumber(ARGV[b + 2]) / tonumber(ARGV[b + 3]) - 1e-9) end
    out[i] = {used, 0}
  elseif kind == 'b' then
    local v = redis.call('HMGET', KEYS[i], 'u', 'r')
    out[i] = {tonumber(v[1]) or 0, tonumber(v[2]) or 0}
  else
    out[i] = {redis.call('ZCOUNT', KEYS[i], now, '+inf'), 0}
  end
end
return out
