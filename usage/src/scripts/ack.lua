-- Drops a sealed outbox once billing has acknowledged it, unless it was replaced meanwhile.
-- KEYS: 1 sealed   ARGV: 1 the id billing acknowledged   Returns: 1 when dropped
if redis.call('HGET', KEYS[1], '_id') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
