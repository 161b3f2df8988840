-- Return what requests reserved and charge what they used: every settlement of a batch of requests in one
-- call. KEYS[i]: settlement i's key. ARGV[1]: six words per settlement, separated by spaces: kind (g|b|s),
-- reserved, used, limit, param, lease id (- when none).
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local words = {}
for word in string.gmatch(ARGV[1], '%S+') do
  words[#words + 1] = word
end
for i = 1, #KEYS do
  local b = (i - 1) * 6 + 1
  local kind = words[b]
  if kind == 'g' then
    local tat = tonumber(redis.call('GET', KEYS[i]))
    if tat then
      local new = tat + (tonumber(words[b + 2]) - tonumber(words[b + 1])) * tonumber(words[b + 4]) / tonumber(words[b + 3])
      if new > now then
        redis.call('SET', KEYS[i], string.format('%.17g', new), 'PX', math.ceil((new - now) * 1000) + 1000)
      else
        redis.call('DEL', KEYS[i])
      end
    end
  elseif kind == 'b' then
    if redis.call('EXISTS', KEYS[i]) == 1 then
      redis.call('HINCRBY', KEYS[i], 'r', -tonumber(words[b + 1]))
      redis.call('HINCRBY', KEYS[i], 'u', words[b + 2])
    end
  else
    redis.call('ZREM', KEYS[i], words[b + 5])
  end
end
return 1
