
-- Returns one lease (docs/leases.md, "Return"): unspent quota units go back to the quota counter, unspent
-- credits back to the mirror, the spent part into the outbox (and so to billing, once), and the unused slots
-- back to the rate limiter when the lease is still the last to have taken slots. Idempotent by lease id.
-- KEYS: 1 leases (hash lh)  2 returned record (lr:<lease id>)  3 rate  4 credits  5 outbox
-- ARGV: 1 lease id  2 holder  3 units spent  4 first unused slot  5 grace (ms)  6 returned record ttl (s)
-- Returns: {outcome, units given back, written off now (0/1)}; outcome 1 returned, 2 already returned,
--   3 written off, 4 unknown, 5 more spent than the lease held (nothing changed)
local leases_key, returned_key, rate_key, credits_key, outbox_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local lease_id, holder = ARGV[1], ARGV[2]
local units_spent, first_unused = tonumber(ARGV[3]), tonumber(ARGV[4])

local returned = redis.call('GET', returned_key)
if returned then
  local parts = split(returned)
  if parts[1] == 'w' then
    return {3, 0, 0}
  end
  return {2, tonumber(parts[2]), 0}
end
local text = redis.call('HGET', leases_key, lease_id)
if not text then
  return {4, 0, 0}
end
local lease = parse_lease(text)
if lease.holder ~= holder then
  return {4, 0, 0}
end
local now_us = clock_us()
if lease.deadline_ms + tonumber(ARGV[5]) <= math.floor(now_us / 1000) then
  write_off(leases_key, credits_key, returned_key, lease_id, lease, ARGV[6])
  return {3, 0, 1}
end
if units_spent > lease.quota_units + lease.credit_units then
  return {5, 0, 0}
end

local spent_quota = math.min(units_spent, lease.quota_units)
local spent_credit_units = units_spent - spent_quota
local back_quota = lease.quota_units - spent_quota
local back_credit_units = lease.credit_units - spent_credit_units
if back_quota > 0 and redis.call('EXISTS', lease.quota_key) == 1 then
  redis.call('DECRBY', lease.quota_key, string.format('%d', back_quota))
end
if back_credit_units > 0 and redis.call('HEXISTS', credits_key, 'b') == 1 then
  redis.call('HINCRBY', credits_key, 'b', string.format('%d', back_credit_units * lease.unit_price))
end
if units_spent > 0 then
  redis.call('HINCRBY', outbox_key, 'u|' .. lease.field, string.format('%d', units_spent))
end
if spent_credit_units > 0 then
  redis.call('HINCRBY', outbox_key, 'c|' .. lease.field, string.format('%d', spent_credit_units * lease.unit_price))
end

-- Slots stacked after the lease by later grants or admissions stay taken: moving the rate key back would
-- hand out their time twice.
if lease.slots > 0 and tonumber(redis.call('GET', rate_key) or '-1') == lease.end_us then
  local unused_from = math.min(math.max(first_unused, 0), lease.slots)
  local tat = math.max(now_us, lease.base_us + unused_from * lease.emission_us)
  redis.call('SET', rate_key, string.format('%d', tat), 'KEEPTTL')
end

remove_lease(leases_key, lease_id, lease)
local given_back = back_quota + back_credit_units
redis.call('SET', returned_key, string.format('r;%d;%d;%d;%d;%s;%s;0;0', given_back, spent_quota,
  spent_credit_units, lease.unit_price, lease.quota_key, lease.field), 'EX', ARGV[6])
return {1, given_back, 0}
