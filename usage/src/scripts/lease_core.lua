-- Shared by the lease scripts (lease_grant.lua, lease_return.lua, lease_writeoff.lua): the lease record and
-- its write-off. Every key of a customer shares the hash tag `{c:C}`, so keys named from a record (the
-- quota key) or from the customer's prefix (a returned lease) are in the slot of the declared keys.
--
-- `P:{c:C}:lh` (hash): lease id -> "<holder>;<quota units>;<credit units>;<unit price>;<slots>;<first slot
--   µs>;<emission µs>;<end of slots µs>;<deadline ms>;<quota key>;<outbox field>", plus the aggregates of
--   the outstanding leases: `_q` quota units, `_c` credit micros, `_s` slots. Deleted when no lease is left.
-- `P:{c:C}:lr:<lease id>` (string, 24 h): "<r|w>;<units given back>;<spent from quota>;<spent credit
--   units>;<unit price>;<quota key>;<outbox field>;<refunded quota units>;<refunded credit units>"; `r`
--   returned, `w` written off.

local function split(text)
  local parts = {}
  for part in string.gmatch(text, '[^;]+') do
    parts[#parts + 1] = part
  end
  return parts
end

local function parse_lease(text)
  local parts = split(text)
  return {
    holder = parts[1],
    quota_units = tonumber(parts[2]),
    credit_units = tonumber(parts[3]),
    unit_price = tonumber(parts[4]),
    slots = tonumber(parts[5]),
    base_us = tonumber(parts[6]),
    emission_us = tonumber(parts[7]),
    end_us = tonumber(parts[8]),
    deadline_ms = tonumber(parts[9]),
    quota_key = parts[10],
    field = parts[11],
  }
end

local function clock_us()
  local clock = redis.call('TIME')
  return tonumber(clock[1]) * 1000000 + tonumber(clock[2])
end

-- Takes a lease out of the outstanding aggregates; the hash goes when no lease is left in it.
local function remove_lease(leases_key, lease_id, lease)
  redis.call('HDEL', leases_key, lease_id)
  redis.call('HINCRBY', leases_key, '_q', string.format('%d', -lease.quota_units))
  redis.call('HINCRBY', leases_key, '_c', string.format('%d', -lease.credit_units * lease.unit_price))
  redis.call('HINCRBY', leases_key, '_s', string.format('%d', -lease.slots))
  if redis.call('HLEN', leases_key) <= 3 then
    redis.call('DEL', leases_key)
  end
end

-- Writes a lease off: its quota units stay counted (never admitted again in the period), its slots stay
-- taken, its credits stay out of the mirror and are added to the written-off field `w` of the credits hash
-- (so reconciliation does not pour them back), and nothing reaches the outbox: it is never billed.
local function write_off(leases_key, credits_key, returned_key, lease_id, lease, returned_ttl)
  remove_lease(leases_key, lease_id, lease)
  local credits = lease.credit_units * lease.unit_price
  if credits > 0 then
    redis.call('HINCRBY', credits_key, 'w', string.format('%d', credits))
  end
  redis.call('SET', returned_key, string.format('w;0;0;0;%d;%s;%s;0;0', lease.unit_price, lease.quota_key,
    lease.field), 'EX', returned_ttl)
end
