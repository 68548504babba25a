-- Seals a customer's outbox for shipping to billing: returns the sealed spending not yet acknowledged, or
-- moves the open outbox to the sealed slot under a new id. New spending keeps going to the open outbox.
-- KEYS: 1 outbox  2 sealed   ARGV: 1 id for a newly sealed outbox
-- Returns: flat list: "_id", id, field, value, ... (empty when there is nothing to ship)
if redis.call('EXISTS', KEYS[2]) == 0 then
  if redis.call('EXISTS', KEYS[1]) == 0 then
    return {}
  end
  redis.call('RENAME', KEYS[1], KEYS[2])
  redis.call('HSET', KEYS[2], '_id', ARGV[1])
end
return redis.call('HGETALL', KEYS[2])
