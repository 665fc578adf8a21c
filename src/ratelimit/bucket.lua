-- Token-bucket decisions on one or more buckets, atomically (see bucket.rs for the arithmetic,
-- which this mirrors).
-- ARGV[1]: for tests only, the time in ms; relay sends '' and the time is Redis's own clock, so
-- every replica agrees on it.
-- KEYS[i]: a bucket, with four arguments from ARGV[2 + 4 (i - 1)]: capacity, window in ms, the
-- op ('take' tokens, all or none; 'refund' tokens taken earlier, up to a full bucket; 'charge'
-- tokens used beyond a reservation, down to empty), and how many tokens.
-- Buckets are applied in order, and after a 'take' that is refused the rest are left alone (a
-- request refused by its rate limit reserves no tokens).
-- Returns {allowed (0|1), level after the decision} for each bucket applied, in order.
local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local out = {}
for i, key in ipairs(KEYS) do
  local base = 2 + (i - 1) * 4
  local capacity = tonumber(ARGV[base])
  local window = tonumber(ARGV[base + 1])
  local op = ARGV[base + 2]
  local units = tonumber(ARGV[base + 3]) * window
  local full = capacity * window
  local stored = redis.call('HMGET', key, 'l', 't')
  local level = tonumber(stored[1])
  local at = tonumber(stored[2])
  if level == nil or at == nil then
    level = full
    at = now
  end
  if now > at then
    level = math.min(full, level + (now - at) * capacity)
    at = now
  end
  local allowed = 0
  if op == 'refund' then
    level = math.min(full, level + units)
    allowed = 1
  elseif op == 'charge' then
    level = math.max(0, level - units)
    allowed = 1
  elseif level >= units then
    level = level - units
    allowed = 1
  end
  redis.call('HSET', key, 'l', string.format('%.0f', level), 't', string.format('%.0f', at))
  -- Idle buckets vanish once they would be full again (an absent bucket is a full one).
  local ms_to_full = math.ceil((full - level) / capacity)
  redis.call('PEXPIRE', key, ms_to_full + 1000)
  out[#out + 1] = allowed
  out[#out + 1] = string.format('%.0f', level)
  if allowed == 0 then
    break
  end
end
return out
