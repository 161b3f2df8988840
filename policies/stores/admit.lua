-- Admission for a batch of requests, each checked and reserved all or nothing, one after the other: the
-- requests that arrived together share one round trip, and each still sees the counters as the ones
-- before it left them. KEYS: every claim's key, request after request.
-- ARGV[1]: words separated by spaces: the number of requests, then per request its number of claims and,
-- per claim, kind (g|b|s), limit, amount, param, soft (0|1), lease id (- when none).
-- Returns per request {ok (1|0), index of the first hard claim that failed (0-based, -1 if none), its
-- retry-after (s), {soft claims that would have failed}, {remaining per claim}, {seconds to reset per claim}}.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local words = {}
for word in string.gmatch(ARGV[1], '%S+') do
  words[#words + 1] = word
end
local out = {}
local k, w = 0, 2
for r = 1, tonumber(words[1]) do
  local n = tonumber(words[w])
  w = w + 1
  local failed, retry = 0, 0
  local over, rem, rst, news = {}, {}, {}, {}
  for i = 1, n do
    local b = w + (i - 1) * 6
    local key = KEYS[k + i]
    local kind, limit, amount, param = words[b], tonumber(words[b + 1]), tonumber(words[b + 2]), tonumber(words[b + 3])
    local fits, wait, left, back = true, 0, 0, 0
    if kind == 'g' then
      local step = param / limit
      local tat = tonumber(redis.call('GET', key) or 0)
      if tat < now then tat = now end
      local new = tat + amount * step
      news[i] = new
      if amount > limit then
        fits, wait, left, back = false, -1, math.floor((now + param - tat) / step), tat - now
      else
        fits, wait, left, back = new - param <= now, new - param - now, math.floor((now + param - new) / step), new - now
      end
    elseif kind == 'b' then
      local v = redis.call('HMGET', key, 'u', 'r')
      left = limit - (tonumber(v[1]) or 0) - (tonumber(v[2]) or 0) - amount
      fits, wait, back = left >= 0, param - now, param - now
    else
      redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
      local held = redis.call('ZCARD', key)
      fits, left = held + 1 <= limit, limit - held - 1
    end
    rem[i], rst[i] = string.format('%.17g', left), string.format('%.17g', back)
    if not fits then
      if words[b + 4] == '1' then
        over[#over + 1] = i - 1
      elseif failed == 0 then
        failed, retry = i, wait
      end
    end
  end
  if failed > 0 then
    out[r] = {0, failed - 1, string.format('%.17g', retry), over, rem, rst}
  else
    for i = 1, n do
      local b = w + (i - 1) * 6
      local key, kind, param = KEYS[k + i], words[b], tonumber(words[b + 3])
      if kind == 'g' then
        redis.call('SET', key, string.format('%.17g', news[i]), 'PX', math.ceil((news[i] - now) * 1000) + 1000)
      elseif kind == 'b' then
        redis.call('HINCRBY', key, 'r', words[b + 2])
        redis.call('EXPIREAT', key, math.ceil(param) + 60)
      else
        redis.call('ZADD', key, now + param, words[b + 5])
        redis.call('PEXPIRE', key, math.ceil(param * 1000))
      end
    end
    out[r] = {1, -1, '0', over, rem, rst}
  end
  k, w = k + n, w + n * 6
end
return out
