-- Applies one credit change from billing once per reference. A loaded balance that is as of this change's
-- sequence or later already contains it; an unloaded one keeps the change pending for the load.
-- KEYS: 1 credits (hash b, s, v)  2 pending grants (hash)  3 applied references (set)
-- ARGV: 1 reference  2 delta (micros, signed)  3 sequence (0: unknown)
-- Returns: {applied (0/1), balance or -1 when not loaded}
if redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 1 then
  local balance = redis.call('HGET', KEYS[1], 'b')
  return {0, balance and tonumber(balance) or -1}
end
redis.call('SADD', KEYS[3], ARGV[1])
local delta, sequence = tonumber(ARGV[2]), tonumber(ARGV[3])
local loaded = redis.call('HMGET', KEYS[1], 'b', 's')
if not loaded[1] then
  redis.call('HSET', KEYS[2], ARGV[1], string.format('%d:%d', sequence, delta))
  return {1, -1}
end
-- Applied or found already in the balance, the reference is now spent: a reconciler holding an older
-- snapshot of the ledger must start again.
redis.call('HINCRBY', KEYS[1], 'v', 1)
if sequence > 0 and sequence <= tonumber(loaded[2]) then
  return {0, tonumber(loaded[1])}
end
-- Never below zero: a negative adjustment larger than what is left costs the customer nothing more.
local balance = math.max(tonumber(loaded[1]) + delta, 0)
redis.call('HSET', KEYS[1], 'b', string.format('%d', balance))
return {1, balance}
