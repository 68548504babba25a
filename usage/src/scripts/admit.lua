-- Decides one request atomically: rate limit (GCRA), then the period quota, then prepaid credits.
-- Everything is validated before the first write, so an error leaves no partial state, and a refused request
-- takes nothing. Only admissions are remembered (by request id); a refused request is decided afresh when
-- retried, since it took nothing.
--
-- KEYS: 1 rate (string, TAT in µs)      2 quota (string, units used)    3 credits (hash b=balance s=seq)
--       4 request record (string "<answer csv>;<units>;<from quota>;<credits>;<quota key>;<field>;<refunded>")
--       5 outbox (hash of net spending not yet sealed for billing)
-- ARGV: 1 units  2 rate_limit  3 rate_period_ms  4 burst  5 included_units  6 overage (0 block, 1 credits)
--       7 unit_price_micros  8 period_end_ms  9 outbox field suffix ("<subscription>|<period start ms>")
--      10 request ttl (s)  11 quota retention after period end (ms)
-- Returns: {decision, replayed, quota_used, quota_limit, units_from_quota, credits_taken, credits_remaining,
--           retry_after_ms, rate_remaining, rate_reset_ms}
-- decision: 1 admitted, 2 rate_limited, 3 quota_exhausted, 4 credits_exhausted, 5 credits not loaded (the
-- caller loads them from billing and asks again; nothing was written).

local function number_at(value, key)
  if value == false or value == nil then
    return 0
  end
  local parsed = tonumber(value)
  if parsed == nil then
    return nil, redis.error_reply('ERR paygate: key ' .. key .. ' holds a non-number')
  end
  return parsed
end

-- Every key is read before anything is written, and a read of a wrong-typed key raises, so a corrupted key
-- fails the call with nothing changed. The outbox is only ever written, so its type is checked here.
local outbox_type = redis.call('TYPE', KEYS[5])['ok']
if outbox_type ~= 'none' and outbox_type ~= 'hash' then
  return redis.error_reply('ERR paygate: key ' .. KEYS[5] .. ' holds a ' .. outbox_type .. ', expected a hash')
end

local remembered = redis.call('GET', KEYS[4])
if remembered then
  local decision = {}
  for field in string.gmatch(string.match(remembered, '^[^;]*'), '[^,]+') do
    decision[#decision + 1] = tonumber(field)
  end
  decision[2] = 1
  return decision
end

local units = tonumber(ARGV[1])
local rate_limit = tonumber(ARGV[2])
local rate_period_ms = tonumber(ARGV[3])
local burst = tonumber(ARGV[4])
local included = tonumber(ARGV[5])
local pays_with_credits = ARGV[6] == '1'
local unit_price = tonumber(ARGV[7])
local period_end_ms = tonumber(ARGV[8])

local clock = redis.call('TIME')
local now_us = tonumber(clock[1]) * 1000000 + tonumber(clock[2])

-- GCRA: a request is allowed when the theoretical arrival time it would push forward stays within
-- `burst` emission intervals of now.
local new_tat, rate_remaining, rate_reset_ms = nil, 0, 0
if rate_limit > 0 then
  local emission_us = rate_period_ms * 1000 / rate_limit
  local tolerance_us = emission_us * burst
  local stored_tat, failure = number_at(redis.call('GET', KEYS[1]), KEYS[1])
  if failure then
    return failure
  end
  local tat = math.max(stored_tat, now_us)
  new_tat = tat + emission_us
  if new_tat - now_us > tolerance_us then
    local retry_after_ms = math.ceil((new_tat - tolerance_us - now_us) / 1000)
    local reset_ms = math.ceil((tat - now_us) / 1000)
    return {2, 0, 0, included, 0, 0, -1, retry_after_ms, 0, reset_ms}
  end
  rate_remaining = math.floor((tolerance_us - (new_tat - now_us)) / emission_us)
  rate_reset_ms = math.ceil((new_tat - now_us) / 1000)
end

local used, failure = number_at(redis.call('GET', KEYS[2]), KEYS[2])
if failure then
  return failure
end
local stored_balance = false
if pays_with_credits then
  stored_balance = redis.call('HGET', KEYS[3], 'b')
end
local from_quota = math.min(units, math.max(included - used, 0))
local overage = units - from_quota
local cost = 0
local balance = -1
if overage > 0 then
  if not pays_with_credits then
    return {3, 0, used, included, 0, 0, -1, 0, rate_remaining, rate_reset_ms}
  end
  if not stored_balance then
    return {5, 0, used, included, 0, 0, -1, 0, rate_remaining, rate_reset_ms}
  end
  balance, failure = number_at(stored_balance, KEYS[3])
  if failure then
    return failure
  end
  cost = overage * unit_price
  if cost > balance then
    return {4, 0, used, included, 0, 0, balance, 0, rate_remaining, rate_reset_ms}
  end
end

-- Every check passed: take, remember, and queue for billing.
if new_tat then
  redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', rate_reset_ms + 1000)
end
if from_quota > 0 then
  redis.call('INCRBY', KEYS[2], from_quota)
  -- Counted from now when the period is already over (a late request, or a clock that disagrees), so
  -- the counter never expires under a request that just used it.
  redis.call('PEXPIREAT', KEYS[2], math.max(period_end_ms, math.floor(now_us / 1000)) + tonumber(ARGV[11]))
end
if cost > 0 then
  balance = redis.call('HINCRBY', KEYS[3], 'b', -cost)
elseif stored_balance then
  balance = tonumber(stored_balance)
end
redis.call('HINCRBY', KEYS[5], 'u|' .. ARGV[9], units)
if cost > 0 then
  redis.call('HINCRBY', KEYS[5], 'c|' .. ARGV[9], cost)
end

local decision = {1, 0, used + from_quota, included, from_quota, cost, balance, 0, rate_remaining, rate_reset_ms}
-- Integers formatted one by one: cjson would round micros above 10^14.
local encoded = {}
for index, value in ipairs(decision) do
  encoded[index] = string.format('%d', value)
end
local record = table.concat({table.concat(encoded, ','), string.format('%d', units), string.format('%d', from_quota),
  string.format('%d', cost), KEYS[2], ARGV[9], '0'}, ';')
redis.call('SET', KEYS[4], record, 'EX', tonumber(ARGV[10]))
return decision
