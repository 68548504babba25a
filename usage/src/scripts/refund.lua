-- Gives back exactly what one admission took, once.
-- KEYS: 1 request record (see admit.lua)  2 the quota key the admission used  3 credits  4 outbox
-- Returns: {refunded (0/1), units, credits}
local record = redis.call('GET', KEYS[1])
if not record then
  return {0, 0, 0}
end
local parts = {}
for part in string.gmatch(record, '[^;]+') do
  parts[#parts + 1] = part
end
local units, from_quota, credits = tonumber(parts[2]), tonumber(parts[3]), tonumber(parts[4])
if parts[7] ~= '0' or parts[5] ~= KEYS[2] then
  return {0, 0, 0}
end
if from_quota > 0 and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('DECRBY', KEYS[2], from_quota)
end
if credits > 0 and redis.call('HEXISTS', KEYS[3], 'b') == 1 then
  redis.call('HINCRBY', KEYS[3], 'b', credits)
end
redis.call('HINCRBY', KEYS[4], 'u|' .. parts[6], -units)
if credits > 0 then
  redis.call('HINCRBY', KEYS[4], 'c|' .. parts[6], -credits)
end
parts[7] = '1'
redis.call('SET', KEYS[1], table.concat(parts, ';'), 'KEEPTTL')
return {1, units, credits}
