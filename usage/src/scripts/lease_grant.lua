
-- Grants one lease (docs/leases.md, "Grant"): at most half of the free quota units, credits only when no
-- included unit is free or parked in another lease, and GCRA slots when the plan is rate limited. A lease
-- that would hold no units, or no slots under a rate limit, is empty: nothing is taken. Idempotent by lease
-- id: the answer is remembered for 24 h and a retried ask gets it back taking nothing more.
-- KEYS: 1 leases (hash lh)  2 grant answer (lg:<lease id>)  3 rate  4 quota  5 credits
-- ARGV: 1 holder  2 lease id  3 units wanted  4 slots wanted  5 min units  6 rate_limit  7 rate_period_ms
--   8 burst  9 included units  10 overage (0 block, 1 credits)  11 unit price (micros)  12 period end (ms)
--   13 ttl (ms)  14 grace (ms)  15 record ttl (s)  16 quota retention after period end (ms)  17 the
--   customer's key prefix `P:{c:C}`  18 outbox field ("<subscription>|<period start ms>")
-- Returns: {replayed, quota units, credit units, unit price, slots, first slot offset µs, emission µs,
--   tolerance µs, ttl ms, quota used, quota limit, credits remaining (-1 not loaded), leases written off}

-- A slot usable for less than this is not worth leasing: such plans are admitted per request.
local MIN_SLOT_WINDOW_US = 20000
-- Slots start this long after the grant, so they are still ahead when the grant reaches the holder.
local LEAD_US = 2000

local leases_key, answer_key, rate_key, quota_key, credits_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local holder, lease_id = ARGV[1], ARGV[2]
local units_wanted, slots_wanted, min_units = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local rate_limit, rate_period_ms, burst = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local included, pays_with_credits, unit_price = tonumber(ARGV[9]), ARGV[10] == '1', tonumber(ARGV[11])
local period_end_ms, ttl_ms, grace_ms = tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14])
local record_ttl, customer_prefix, field = ARGV[15], ARGV[17], ARGV[18]

local remembered = redis.call('GET', answer_key)
if remembered then
  local answer = {}
  for number in string.gmatch(remembered, '[^,]+') do
    answer[#answer + 1] = tonumber(number)
  end
  answer[1] = 1
  answer[13] = 0
  return answer
end

local now_us = clock_us()
local now_ms = math.floor(now_us / 1000)

local written_off = 0
local outstanding = redis.call('HGETALL', leases_key)
for index = 1, #outstanding, 2 do
  local id = outstanding[index]
  if string.sub(id, 1, 1) ~= '_' then
    local lease = parse_lease(outstanding[index + 1])
    if lease.deadline_ms + grace_ms <= now_ms then
      write_off(leases_key, credits_key, customer_prefix .. ':lr:' .. id, id, lease, record_ttl)
      written_off = written_off + 1
    end
  end
end

local used = tonumber(redis.call('GET', quota_key) or '0')
local stored_balance = redis.call('HGET', credits_key, 'b')
local balance = stored_balance and tonumber(stored_balance) or -1
local deadline_ms = math.min(now_ms + ttl_ms, period_end_ms)

local function answer_with(quota_units, credit_units, slots, offset_us, emission_us, tolerance_us, lease_ttl_ms)
  local answer = {0, quota_units, credit_units, unit_price, slots, offset_us, emission_us, tolerance_us,
    lease_ttl_ms, used + quota_units, included, balance}
  local numbers = {}
  for index, number in ipairs(answer) do
    numbers[index] = string.format('%d', number)
  end
  redis.call('SET', answer_key, table.concat(numbers, ','), 'EX', record_ttl)
  answer[13] = written_off
  return answer
end

if deadline_ms <= now_ms then
  return answer_with(0, 0, 0, 0, 0, 0, 0)
end

local free = math.max(included - used, 0)
local quota_units = math.min(units_wanted, math.floor(free / 2))
if quota_units < min_units then
  quota_units = 0
end

local credit_units = 0
local parked_quota = tonumber(redis.call('HGET', leases_key, '_q') or '0')
if pays_with_credits and free == 0 and parked_quota == 0 and balance > 0 then
  credit_units = math.min(units_wanted - quota_units, math.floor(balance / 2 / unit_price))
  if credit_units < min_units then
    credit_units = 0
  end
end

local slots, base_us, emission_us, tolerance_us = 0, 0, 0, 0
if rate_limit > 0 and quota_units + credit_units > 0 then
  -- The interval rounded up and the burst window rounded down: the holder's local check is never looser
  -- than the admission script's.
  local exact_emission_us = rate_period_ms * 1000 / rate_limit
  emission_us = math.ceil(exact_emission_us)
  tolerance_us = math.floor(exact_emission_us * burst)
  if tolerance_us - emission_us >= MIN_SLOT_WINDOW_US then
    local tat = tonumber(redis.call('GET', rate_key) or '0')
    base_us = math.max(tat, now_us + LEAD_US)
    local available = math.floor((now_us + tolerance_us - base_us) / emission_us)
    slots = math.min(slots_wanted, math.floor(math.max(available, 0) / 2))
  end
  if slots == 0 then
    quota_units, credit_units = 0, 0
  end
end

if quota_units + credit_units == 0 then
  return answer_with(0, 0, 0, 0, 0, 0, 0)
end

if quota_units > 0 then
  redis.call('INCRBY', quota_key, string.format('%d', quota_units))
  if used == 0 or period_end_ms < now_ms then
    redis.call('PEXPIREAT', quota_key, string.format('%d', math.max(period_end_ms, now_ms) + tonumber(ARGV[16])))
  end
end
if credit_units > 0 then
  balance = redis.call('HINCRBY', credits_key, 'b', string.format('%d', -credit_units * unit_price))
end
local end_us = base_us + slots * emission_us
if slots > 0 then
  redis.call('SET', rate_key, string.format('%d', end_us), 'PX',
    string.format('%d', math.ceil((end_us - now_us) / 1000) + 1000))
end
redis.call('HSET', leases_key, lease_id, string.format('%s;%d;%d;%d;%d;%d;%d;%d;%d;%s;%s', holder, quota_units,
  credit_units, unit_price, slots, base_us, emission_us, end_us, deadline_ms, quota_key, field))
redis.call('HINCRBY', leases_key, '_q', string.format('%d', quota_units))
redis.call('HINCRBY', leases_key, '_c', string.format('%d', credit_units * unit_price))
redis.call('HINCRBY', leases_key, '_s', string.format('%d', slots))
local offset_us = 0
if slots > 0 then
  offset_us = base_us - now_us
end
return answer_with(quota_units, credit_units, slots, offset_us, emission_us, tolerance_us, deadline_ms - now_ms)
