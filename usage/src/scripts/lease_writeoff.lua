
-- Writes off one lease whose deadline and grace have passed (the sweep over `P:leases`).
-- KEYS: 1 leases (hash lh)  2 credits  3 the lease's returned record (lr)
-- ARGV: 1 lease id  2 grace (ms)  3 returned record ttl (s)
-- Returns: {0} no such lease outstanding (returned, written off, or never granted), {1} written off now,
--   {2, due ms} not due yet (Redis's clock says so)
local text = redis.call('HGET', KEYS[1], ARGV[1])
if not text then
  return {0}
end
local lease = parse_lease(text)
local due_ms = lease.deadline_ms + tonumber(ARGV[2])
if math.floor(clock_us() / 1000) < due_ms then
  return {2, due_ms}
end
write_off(KEYS[1], KEYS[2], KEYS[3], ARGV[1], lease, ARGV[3])
return {1}
