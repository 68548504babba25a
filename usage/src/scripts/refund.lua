-- Gives back exactly what one admission took, once.
-- KEYS: 1 request record  2 the quota key the admission used  3 credits  4 outbox
-- Returns: {refunded (0/1), units, credits}
local record = redis.call('HMGET', KEYS[1], 'u', 'q', 'c', 'k', 'f', 'r')
if not record[1] or record[6] == '1' or record[4] ~= KEYS[2] then
  return {0, 0, 0}
end
local units, from_quota, credits = tonumber(record[1]), tonumber(record[2]), tonumber(record[3])
if from_quota > 0 and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('DECRBY', KEYS[2], from_quota)
end
if credits > 0 and redis.call('HEXISTS', KEYS[3], 'b') == 1 then
  redis.call('HINCRBY', KEYS[3], 'b', credits)
end
redis.call('HINCRBY', KEYS[4], 'u|' .. record[5], -units)
if credits > 0 then
  redis.call('HINCRBY', KEYS[4], 'c|' .. record[5], -credits)
end
redis.call('HSET', KEYS[1], 'r', 1)
return {1, units, credits}
