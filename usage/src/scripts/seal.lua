-- Seals a customer's outbox for shipping to billing: returns the sealed spending not yet acknowledged, or
-- moves the open outbox to the sealed slot under a new id and the customer's next outbox number (billing
-- applies each number once, in increasing order, so an outbox sealed again after Redis lost the first
-- seal is not charged twice). New spending keeps going to the open outbox.
-- KEYS: 1 outbox  2 sealed  3 credits (hash; `n` the last outbox number)   ARGV: 1 id for a newly sealed outbox
-- Returns: flat list: "_id", id, "_n", number, field, value, ... (empty when there is nothing to ship; a
-- sealed outbox from before numbering has no "_n")
if redis.call('EXISTS', KEYS[2]) == 0 then
  if redis.call('EXISTS', KEYS[1]) == 0 then
    return {}
  end
  local number = redis.call('HINCRBY', KEYS[3], 'n', 1)
  redis.call('RENAME', KEYS[1], KEYS[2])
  redis.call('HSET', KEYS[2], '_id', ARGV[1], '_n', string.format('%d', number))
end
return redis.call('HGETALL', KEYS[2])
