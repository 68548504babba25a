-- Loads a customer's spendable balance from billing's figure, unless already loaded (never an increment on
-- this path, so two replicas loading at once cannot double it), then applies grants that arrived while it
-- was not loaded and are newer than billing's figure.
-- KEYS: 1 credits (hash b, s, v)  2 pending grants (hash reference -> "sequence:delta")
-- ARGV: 1 balance from billing  2 the change-feed sequence that balance is as of
-- Returns: {loaded_now (0/1), balance}
local existing = redis.call('HGET', KEYS[1], 'b')
if existing then
  return {0, tonumber(existing)}
end
local balance = tonumber(ARGV[1])
local as_of = tonumber(ARGV[2])
local pending = redis.call('HGETALL', KEYS[2])
for index = 1, #pending, 2 do
  local sequence, delta = string.match(pending[index + 1], '^(-?%d+):(-?%d+)$')
  sequence, delta = tonumber(sequence), tonumber(delta)
  if sequence == 0 or sequence > as_of then
    balance = math.max(balance + delta, 0)
  end
end
balance = math.max(balance, 0)
redis.call('HSET', KEYS[1], 'b', string.format('%d', balance), 's', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'v', 1)
redis.call('DEL', KEYS[2])
return {1, balance}
