-- Compares a customer's credit mirror with billing's ledger and repairs it toward the ledger:
-- spendable = ledger balance - credits not yet charged in the ledger (the open outbox, and the sealed one
-- unless billing has applied its number), never below zero. The ledger figures come from one snapshot
-- taken after `version` was read; any change since that the snapshot may not show (a credit change from
-- billing's feed, an acknowledged report, a load or another repair) moved `v`, and the call is refused
-- so the caller takes a new snapshot. Admissions, refunds and seals move spending between the balance and
-- the outboxes and need no retry.
-- Billing applies an outbox only when its number is above the last it applied. So when Redis's outbox
-- number is behind billing's (Redis lost a seal), the open outbox will be sealed under a number billing
-- skips: it may hold spending billing has charged already (the lost seal's), and the rest is not charged,
-- in the customer's favour; either way it is not subtracted. Once a sealed outbox is acknowledged, the
-- acknowledgement lifts the number past billing's, and what is sealed after that is charged.
-- Credits in outstanding leases and credits written off (`w`) are out of the mirror and not in the ledger:
-- the first come back or reach the outbox at the lease's return, the second never do (never billed, never
-- spendable again), so both are subtracted too.
-- KEYS: 1 credits (hash b, s, n, v, w)  2 outbox  3 sealed  4 outstanding leases (hash; `_c` credit micros)
-- ARGV: 1 version read before the snapshot  2 ledger balance  3 feed sequence of the snapshot
--       4 last outbox number billing applied
-- Returns: {status, balance before, balance after, behind}
--   status: 0 nothing to repair, 1 repaired, 2 not loaded (nothing to compare), 3 changed since `version`
--   behind: 1 when billing's outbox number was ahead of Redis's (Redis lost writes)
local state = redis.call('HMGET', KEYS[1], 'b', 'v', 'n', 'w')
local billed = tonumber(ARGV[4])
local numbered = tonumber(state[3] or '0')
local behind = 0
if numbered < billed then
  behind = 1
end
local open = redis.call('HGETALL', KEYS[2])
local sealed = redis.call('HGETALL', KEYS[3])
if behind == 1 and #open == 0 and #sealed == 0 then
  -- Nothing is waiting for a number: the next outbox can take one billing will apply.
  redis.call('HSET', KEYS[1], 'n', ARGV[4])
end
if not state[1] then
  return {2, -1, -1, behind}
end
if (state[2] or '0') ~= ARGV[1] then
  return {3, -1, -1, behind}
end

local function credits_in(fields)
  local total = 0
  for index = 1, #fields, 2 do
    if string.sub(fields[index], 1, 2) == 'c|' then
      total = total + tonumber(fields[index + 1])
    end
  end
  return total
end

local unreported = 0
if #sealed > 0 then
  local number = nil
  for index = 1, #sealed, 2 do
    if sealed[index] == '_n' then
      number = tonumber(sealed[index + 1])
    end
  end
  if number == nil then
    -- Sealed before outboxes were numbered: whether billing has it is unknown until it is acknowledged.
    return {3, -1, -1, behind}
  end
  if number > billed then
    unreported = unreported + credits_in(sealed)
  end
end
-- With a sealed outbox in flight, the open one is sealed after its acknowledgement, under a number
-- billing applies.
if #sealed > 0 or behind == 0 then
  unreported = unreported + credits_in(open)
end

unreported = unreported + tonumber(state[4] or '0') + tonumber(redis.call('HGET', KEYS[4], '_c') or '0')

local balance = tonumber(state[1])
local expected = math.max(tonumber(ARGV[2]) - unreported, 0)
if expected == balance then
  return {0, balance, balance, behind}
end
redis.call('HSET', KEYS[1], 'b', string.format('%d', expected), 's', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'v', 1)
return {1, balance, expected, behind}
