-- One call for every request that reached the store while the previous call was on its way: first the
-- settlements of requests that ended, then the admissions of requests that arrived, each admission all or
-- nothing, one after the other, each seeing the counters as the ones before it left them.
-- A counter is read from Redis once per call and written back once at the end (the requests of a call
-- mostly share their keys: one budget, one bucket, one set of slots), so Redis's work grows with the keys
-- a call touches, not with its requests.
-- KEYS: the settlements' keys (one per settled counter), then every claim's key, request after request.
-- ARGV[1], settlements, words separated by spaces, per counter its kind and then:
--   g: used - reserved (summed over the requests), limit, period;  b: reserved, used (summed);
--   s: the number of leases, then the lease ids.
-- ARGV[2], admissions: the number of requests, then per request its number of claims and, per claim,
-- kind (g|b|s), limit, amount, param, soft (0|1), lease id (- when none).
-- Returns one string, a line per request: ok (1|0), index of the first hard claim that failed (0-based, -1
-- if none), its retry-after (s), the number of soft claims that would have failed and their indexes, then
-- per claim what remains after it, then per claim the seconds until it resets.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function words(text)
  local out = {}
  for word in string.gmatch(text, '%S+') do
    out[#out + 1] = word
  end
  return out
end

local k = 0
local s = words(ARGV[1])
local w = 1
while w <= #s do
  k = k + 1
  local key, kind = KEYS[k], s[w]
  if kind == 'g' then
    local tat = tonumber(redis.call('GET', key))
    if tat then
      local new = tat + tonumber(s[w + 1]) * tonumber(s[w + 3]) / tonumber(s[w + 2])
      if new > now then
        redis.call('SET', key, string.format('%.17g', new), 'PX', math.ceil((new - now) * 1000) + 1000)
      else
        redis.call('DEL', key)
      end
    end
    w = w + 4
  elseif kind == 'b' then
    if redis.call('EXISTS', key) == 1 then
      redis.call('HINCRBY', key, 'r', -tonumber(s[w + 1]))
      redis.call('HINCRBY', key, 'u', s[w + 2])
    end
    w = w + 3
  else
    local n = tonumber(s[w + 1])
    redis.call('ZREM', key, unpack(s, w + 2, w + 1 + n))
    w = w + 2 + n
  end
end

local a = words(ARGV[2])
local tats, budgets, slots = {}, {}, {}  -- key -> what Redis holds, as this call has changed it so far
local order = {}  -- keys in the order first written, for the write-back
local out = {}
w = 2
for r = 1, tonumber(a[1] or '0') do
  local n = tonumber(a[w])
  w = w + 1
  local failed, retry = 0, 0
  local over, rem, rst, news = {}, {}, {}, {}
  for i = 1, n do
    local b = w + (i - 1) * 6
    local key = KEYS[k + i]
    local kind, limit, amount, param = a[b], tonumber(a[b + 1]), tonumber(a[b + 2]), tonumber(a[b + 3])
    local fits, wait, left, back = true, 0, 0, 0
    if kind == 'g' then
      local held = tats[key]
      if held == nil then
        held = {tonumber(redis.call('GET', key) or 0), false}
        tats[key] = held
      end
      local tat = held[1]
      if tat < now then tat = now end
      local step = param / limit
      local new = tat + amount * step
      news[i] = new
      if amount > limit then
        fits, wait, left, back = false, -1, math.floor((now + param - tat) / step), tat - now
      else
        fits, wait, left, back = new - param <= now, new - param - now, math.floor((now + param - new) / step), new - now
      end
    elseif kind == 'b' then
      local held = budgets[key]
      if held == nil then
        local v = redis.call('HMGET', key, 'u', 'r')
        held = {(tonumber(v[1]) or 0) + (tonumber(v[2]) or 0), 0, param, false}
        budgets[key] = held
      end
      left = limit - held[1] - amount
      fits, wait, back = left >= 0, param - now, param - now
    else
      local held = slots[key]
      if held == nil then
        redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
        held = {redis.call('ZCARD', key), {}, param}
        slots[key] = held
      end
      fits, left = held[1] + 1 <= limit, limit - held[1] - 1
    end
    rem[i], rst[i] = left, back  -- numbers: table.concat writes them (%.14g), cheaper than string.format here
    if not fits then
      if a[b + 4] == '1' then
        over[#over + 1] = i - 1
      elseif failed == 0 then
        failed, retry = i, wait
      end
    end
  end
  if failed > 0 then
    out[r] = '0 ' .. (failed - 1) .. ' ' .. retry .. ' ' .. #over
  else
    for i = 1, n do
      local b = w + (i - 1) * 6
      local key, kind = KEYS[k + i], a[b]
      if kind == 'g' then
        local held = tats[key]
        if not held[2] then order[#order + 1] = key end
        held[1], held[2] = news[i], true
      elseif kind == 'b' then
        local held = budgets[key]
        if not held[4] then order[#order + 1] = key end
        held[1], held[2], held[4] = held[1] + tonumber(a[b + 2]), held[2] + tonumber(a[b + 2]), true
      else
        local held = slots[key]
        if #held[2] == 0 then order[#order + 1] = key end
        held[1] = held[1] + 1
        held[2][#held[2] + 1] = now + tonumber(a[b + 3])
        held[2][#held[2] + 1] = a[b + 5]
      end
    end
    out[r] = '1 -1 0 ' .. #over
  end
  if #over > 0 then out[r] = out[r] .. ' ' .. table.concat(over, ' ') end
  out[r] = out[r] .. ' ' .. table.concat(rem, ' ') .. ' ' .. table.concat(rst, ' ')
  k, w = k + n, w + n * 6
end

for _, key in ipairs(order) do
  local g, b, sl = tats[key], budgets[key], slots[key]
  if g then
    redis.call('SET', key, string.format('%.17g', g[1]), 'PX', math.ceil((g[1] - now) * 1000) + 1000)
  elseif b then
    redis.call('HINCRBY', key, 'r', b[2])
    redis.call('EXPIREAT', key, math.ceil(b[3]) + 60)
  else
    redis.call('ZADD', key, unpack(sl[2]))
    redis.call('PEXPIRE', key, math.ceil(sl[3] * 1000))
  end
end
return table.concat(out, '\n')
