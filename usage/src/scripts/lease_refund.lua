-- Refunds one request admitted from a lease after the lease was returned (a late refund), once per request
-- id: credits first, then quota units, never more than the lease spent; the outbox gets the negative. A
-- lease written off was never billed and refunds nothing.
-- KEYS: 1 returned record (lr:<lease id>, see lease_core.lua)  2 refund marker of the request id
--   3 credits  4 outbox
-- ARGV: 1 units  2 marker ttl (s)
-- Returns: {refunded (0/1), units, credits (micros)}
local returned = redis.call('GET', KEYS[1])
if not returned or redis.call('EXISTS', KEYS[2]) == 1 then
  return {0, 0, 0}
end
local parts = {}
for part in string.gmatch(returned, '[^;]+') do
  parts[#parts + 1] = part
end
if parts[1] ~= 'r' then
  return {0, 0, 0}
end
local spent_quota, spent_credit_units, unit_price = tonumber(parts[3]), tonumber(parts[4]), tonumber(parts[5])
local quota_key, field = parts[6], parts[7]
local refunded_quota, refunded_credit_units = tonumber(parts[8]), tonumber(parts[9])
local units = tonumber(ARGV[1])

local credit_units = math.min(units, spent_credit_units - refunded_credit_units)
local quota_units = math.min(units - credit_units, spent_quota - refunded_quota)
if credit_units + quota_units <= 0 then
  return {0, 0, 0}
end
local credits = credit_units * unit_price
if quota_units > 0 and redis.call('EXISTS', quota_key) == 1 then
  redis.call('DECRBY', quota_key, string.format('%d', quota_units))
end
if credits > 0 and redis.call('HEXISTS', KEYS[3], 'b') == 1 then
  redis.call('HINCRBY', KEYS[3], 'b', string.format('%d', credits))
end
redis.call('HINCRBY', KEYS[4], 'u|' .. field, string.format('%d', -(credit_units + quota_units)))
if credits > 0 then
  redis.call('HINCRBY', KEYS[4], 'c|' .. field, string.format('%d', -credits))
end
parts[8] = string.format('%d', refunded_quota + quota_units)
parts[9] = string.format('%d', refunded_credit_units + credit_units)
redis.call('SET', KEYS[1], table.concat(parts, ';'), 'KEEPTTL')
redis.call('SET', KEYS[2], '1', 'EX', ARGV[2])
return {1, credit_units + quota_units, credits}
