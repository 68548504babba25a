-- Drops a sealed outbox once billing has acknowledged it, unless it was replaced meanwhile, and catches
-- the customer's outbox number up with billing's: billing ahead of Redis means Redis lost writes (the
-- reconciler then reloads the mirror).
-- KEYS: 1 sealed  2 credits (hash; `n` last outbox number, `v` version)
-- ARGV: 1 the id billing acknowledged  2 the customer's last outbox number billing applied (0: unknown)
-- Returns: {dropped (0/1), behind (1 when billing's number was ahead of Redis's)}
local dropped = 0
if redis.call('HGET', KEYS[1], '_id') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  -- The unreported spending changed without the ledger changing under a reconciler's snapshot.
  redis.call('HINCRBY', KEYS[2], 'v', 1)
  dropped = 1
end
local billed = tonumber(ARGV[2])
local behind = 0
if billed > tonumber(redis.call('HGET', KEYS[2], 'n') or '0') then
  redis.call('HSET', KEYS[2], 'n', ARGV[2])
  behind = 1
end
return {dropped, behind}
