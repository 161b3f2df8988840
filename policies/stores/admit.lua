-- Check every claim, then reserve all of them only if every hard claim fits. One call per request.
-- KEYS[i]: claim i's key. ARGV, six per claim: kind (g|b|s), limit, amount, param, soft (0|1), lease id.
-- Returns {ok (1|0), index of the first hard claim that failed (0-based, -1 if none), its retry-after (s),
--          {soft claims that would have failed}, {remaining per claim}, {seconds to reset per claim}}.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local failed, retry = 0, 0
local over, rem, rst, news = {}, {}, {}, {}
for i = 1, #KEYS do
  local b = (i - 1) * 6
  local kind, limit, amount, param = ARGV[b + 1], tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
  local fits, wait, left, back = true, 0, 0, 0
  if kind == 'g' then
    local step = param / limit
    local tat = tonumber(redis.call('GET', KEYS[i]) or 0)
    if tat < now then tat = now end
    local new = tat + amount * step
    news[i] = new
    if amount > limit then
      fits, wait, left, back = false, -1, math.floor((now + param - tat) / step), tat - now
    else
      fits, wait, left, back = new - param <= now, new - param - now, math.floor((now + param - new) / step), new - now
    end
  elseif kind == 'b' then
    local v = redis.call('HMGET', KEYS[i], 'u', 'r')
    left = limit - (tonumber(v[1]) or 0) - (tonumber(v[2]) or 0) - amount
    fits, wait, back = left >= 0, param - now, param - now
  else
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
    local held = redis.call('ZCARD', KEYS[i])
    fits, left = held + 1 <= limit, limit - held - 1
  end
  rem[i], rst[i] = string.format('%.17g', left), string.format('%.17g', back)
  if not fits then
    if ARGV[b + 5] == '1' then
      over[#over + 1] = i - 1
    elseif failed == 0 then
      failed, retry = i, wait
    end
  end
end
if failed > 0 then
  return {0, failed - 1, string.format('%.17g', retry), over, rem, rst}
end
for i = 1, #KEYS do
  local b = (i - 1) * 6
  local kind, param = ARGV[b + 1], tonumber(ARGV[b + 4])
  if kind == 'g' then
    redis.call('SET', KEYS[i], string.format('%.17g', news[i]), 'PX', math.ceil((news[i] - now) * 1000) + 1000)
  elseif kind == 'b' then
    redis.call('HINCRBY', KEYS[i], 'r', ARGV[b + 3])
    redis.call('EXPIREAT', KEYS[i], math.ceil(param) + 60)
  else
    redis.call('ZADD', KEYS[i], now + param, ARGV[b + 6])
    redis.call('PEXPIRE', KEYS[i], math.ceil(param * 1000))
  end
end
return {1, -1, '0', over, rem, rst}
