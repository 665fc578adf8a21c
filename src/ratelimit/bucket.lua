-- One token-bucket decision, atomically (see bucket.rs for the arithmetic, which this mirrors).
-- KEYS[1]: the bucket. ARGV[1]: capacity, ARGV[2]: window in ms; ARGV[3]: 'take' tokens (all
-- or none), 'refund' tokens taken earlier (up to a full bucket), or 'charge' tokens used beyond
-- a reservation (down to empty); ARGV[4]: how many tokens;
-- ARGV[5], for tests only: the time in ms (relay never sends it).
-- Returns {allowed (0|1), level after the decision}. Time is Redis's own clock, so every
-- replica agrees on it.
local capacity = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local full = capacity * window
local refund = ARGV[3] == 'refund'
local units = tonumber(ARGV[4]) * window
local now
if ARGV[5] then
  now = tonumber(ARGV[5])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local stored = redis.call('HMGET', KEYS[1], 'l', 't')
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
if refund then
  level = math.min(full, level + units)
  allowed = 1
elseif ARGV[3] == 'charge' then
  level = math.max(0, level - units)
  allowed = 1
elseif level >= units then
  level = level - units
  allowed = 1
end
redis.call('HSET', KEYS[1], 'l', string.format('%.0f', level), 't', string.format('%.0f', at))
-- Idle buckets vanish once they would be full again (an absent bucket is a full one).
local ms_to_full = math.ceil((full - level) / capacity)
redis.call('PEXPIRE', KEYS[1], ms_to_full + 1000)
return {allowed, string.format('%.0f', level)}
