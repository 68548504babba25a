-- The admission decision, shared by admit.lua (one request) and admit_many.lua (several requests of one
-- customer in one call). Decides one request atomically: rate limit (GCRA), then the period quota, then
-- prepaid credits. Every key is read (and every stored number checked) before the first write, so an error
-- leaves no partial state, and a refused request takes nothing. Only admissions are remembered (by request
-- id); a refused request is decided afresh when retried, since it took nothing.
--
-- keys (6 per request): 1 rate (string, TAT in µs)  2 quota (string, units used)  3 credits (hash b=balance
--   s=seq)  4 request record (string "<answer csv>;<units>;<from quota>;<credits>;<quota key>;<field>;
--   <refunded>")  5 outbox (hash of net spending not yet sealed for billing)  6 outstanding leases (hash,
--   see lease_core.lua; only its aggregates `_q`, `_c`, `_s` are read)
-- args (12 per request): 1 units  2 rate_limit  3 rate_period_ms  4 burst  5 included_units  6 overage (0
--   block, 1 credits)  7 unit_price_micros  8 period_end_ms  9 outbox field suffix ("<subscription>|<period
--   start ms>")  10 request ttl (s)  11 quota retention after period end (ms)  12 final (1: decide for
--   good, never "held elsewhere")
-- Answer per request: {decision, replayed, quota_used, quota_limit, units_from_quota, credits_taken,
--   credits_remaining, retry_after_ms, rate_remaining, rate_reset_ms}, or an error reply.
-- decision: 1 admitted, 2 rate_limited, 3 quota_exhausted, 4 credits_exhausted, 5 credits not loaded (the
-- caller loads them from billing and asks again; nothing was written), 6 held elsewhere: the request would
-- be refused, or would spend credits, while outstanding leases hold units (or slots) that could serve it;
-- nothing was written, the caller recalls those leases and decides again with `final` set.

-- Reads go through pcall, so a wrong-typed key becomes this request's error reply instead of aborting a
-- call that may already have admitted other requests.
local function read(...)
  local value = redis.pcall(...)
  if type(value) == 'table' and value.err then
    return nil, value
  end
  return value
end

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

local checked_outboxes = {}
local now_us = nil

-- The outstanding leases' aggregates {quota units, credit micros, slots}; zeros when the decision is final.
local function leased(leases_key, final)
  if final then
    return {0, 0, 0}
  end
  local values, failure = read('HMGET', leases_key, '_q', '_c', '_s')
  if failure then
    return nil, failure
  end
  return {tonumber(values[1] or '0') or 0, tonumber(values[2] or '0') or 0, tonumber(values[3] or '0') or 0}
end

local function admit(keys, k, args, a)
  local rate_key, quota_key, credits_key, request_key, outbox_key, leases_key =
    keys[k + 1], keys[k + 2], keys[k + 3], keys[k + 4], keys[k + 5], keys[k + 6]

  -- The outbox is only ever written, so its type is checked here (once per call).
  if not checked_outboxes[outbox_key] then
    local outbox_type, failure = read('TYPE', outbox_key)
    if failure then
      return failure
    end
    outbox_type = outbox_type['ok']
    if outbox_type ~= 'none' and outbox_type ~= 'hash' then
      return redis.error_reply('ERR paygate: key ' .. outbox_key .. ' holds a ' .. outbox_type .. ', expected a hash')
    end
    checked_outboxes[outbox_key] = true
  end

  local remembered, failure = read('GET', request_key)
  if failure then
    return failure
  end
  if remembered then
    local decision = {}
    for field in string.gmatch(string.match(remembered, '^[^;]*'), '[^,]+') do
      decision[#decision + 1] = tonumber(field)
    end
    decision[2] = 1
    return decision
  end

  local units_text = args[a + 1]
  local units = tonumber(units_text)
  local rate_limit = tonumber(args[a + 2])
  local rate_period_ms = tonumber(args[a + 3])
  local burst = tonumber(args[a + 4])
  local included = tonumber(args[a + 5])
  local pays_with_credits = args[a + 6] == '1'
  local unit_price = tonumber(args[a + 7])
  local period_end_ms = tonumber(args[a + 8])
  local field = args[a + 9]
  local held, failure = leased(leases_key, args[a + 12] == '1')
  if failure then
    return failure
  end

  if not now_us then
    local clock = redis.call('TIME')
    now_us = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
  end

  -- GCRA: a request is allowed when the theoretical arrival time it would push forward stays within
  -- `burst` emission intervals of now.
  local new_tat, rate_remaining, rate_reset_ms = nil, 0, 0
  if rate_limit > 0 then
    local emission_us = rate_period_ms * 1000 / rate_limit
    local tolerance_us = emission_us * burst
    local stored, failure = read('GET', rate_key)
    if failure then
      return failure
    end
    local stored_tat
    stored_tat, failure = number_at(stored, rate_key)
    if failure then
      return failure
    end
    local tat = math.max(stored_tat, now_us)
    new_tat = tat + emission_us
    if new_tat - now_us > tolerance_us then
      if held[3] > 0 then
        return {6, 0, 0, included, 0, 0, -1, 0, 0, 0}
      end
      local retry_after_ms = math.ceil((new_tat - tolerance_us - now_us) / 1000)
      local reset_ms = math.ceil((tat - now_us) / 1000)
      return {2, 0, 0, included, 0, 0, -1, retry_after_ms, 0, reset_ms}
    end
    rate_remaining = math.floor((tolerance_us - (new_tat - now_us)) / emission_us)
    rate_reset_ms = math.ceil((new_tat - now_us) / 1000)
  end

  local stored_used, failure = read('GET', quota_key)
  if failure then
    return failure
  end
  local used
  used, failure = number_at(stored_used, quota_key)
  if failure then
    return failure
  end
  local stored_balance = false
  if pays_with_credits then
    stored_balance, failure = read('HGET', credits_key, 'b')
    if failure then
      return failure
    end
  end
  local from_quota = math.min(units, math.max(included - used, 0))
  local overage = units - from_quota
  local cost = 0
  local balance = -1
  if overage > 0 then
    if not pays_with_credits then
      if held[1] > 0 then
        return {6, 0, used, included, 0, 0, -1, 0, rate_remaining, rate_reset_ms}
      end
      return {3, 0, used, included, 0, 0, -1, 0, rate_remaining, rate_reset_ms}
    end
    if not stored_balance then
      return {5, 0, used, included, 0, 0, -1, 0, rate_remaining, rate_reset_ms}
    end
    balance, failure = number_at(stored_balance, credits_key)
    if failure then
      return failure
    end
    cost = overage * unit_price
    -- Credits are never spent while included units are parked in a lease, nor refused while leases
    -- hold units that could pay.
    if held[1] > 0 or (cost > balance and held[2] > 0) then
      return {6, 0, used, included, 0, 0, balance, 0, rate_remaining, rate_reset_ms}
    end
    if cost > balance then
      return {4, 0, used, included, 0, 0, balance, 0, rate_remaining, rate_reset_ms}
    end
  end

  -- Every check passed: take, remember, and queue for billing. Numbers go to redis.call as strings
  -- formatted with %d: a Lua number argument would be converted with %.14g, which is slower and rounds.
  if new_tat then
    redis.call('SET', rate_key, string.format('%d', new_tat), 'PX', string.format('%d', rate_reset_ms + 1000))
  end
  if from_quota > 0 then
    redis.call('INCRBY', quota_key, string.format('%d', from_quota))
    local now_ms = math.floor(now_us / 1000)
    -- The counter's life is set when the period's first unit is taken; counted from now when the period
    -- is already over (a late request, or a clock that disagrees), so the counter never expires under a
    -- request that just used it.
    if used == 0 or period_end_ms < now_ms then
      redis.call('PEXPIREAT', quota_key, string.format('%d', math.max(period_end_ms, now_ms) + tonumber(args[a + 11])))
    end
  end
  if cost > 0 then
    balance = redis.call('HINCRBY', credits_key, 'b', string.format('%d', -cost))
  elseif stored_balance then
    balance = tonumber(stored_balance)
  end
  redis.call('HINCRBY', outbox_key, 'u|' .. field, units_text)
  if cost > 0 then
    redis.call('HINCRBY', outbox_key, 'c|' .. field, string.format('%d', cost))
  end

  local quota_used = used + from_quota
  local record = string.format('1,0,%d,%d,%d,%d,%d,0,%d,%d;%s;%d;%d;%s;%s;0', quota_used, included, from_quota, cost,
    balance, rate_remaining, rate_reset_ms, units_text, from_quota, cost, quota_key, field)
  redis.call('SET', request_key, record, 'EX', args[a + 10])
  return {1, 0, quota_used, included, from_quota, cost, balance, 0, rate_remaining, rate_reset_ms}
end
