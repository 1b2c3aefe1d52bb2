-- client: one client key's limits (server.clients[]), admitted and settled atomically.
-- Standalone (no lib.lua): it touches one key of its own, KEYS[1] = hash {prefix:client:<name>}
--   'q'  requests/tokens per minute, 1 s buckets, as lib.lua's quota_* (a request counts for
--        its bucket and the 60 after it, so no minute anywhere holds more than the limit)
--   'l'  in-flight leases "token=expiry token=expiry ..." (expired ones drop out)
--   'b'  spend of the current budget period "<period>:<micro-USD>"
-- edgeroute/state/memory_clients.py (MemoryClients) is the reference model of the same rules.
-- ARGV: op rpm tpm max_concurrency budget_micro period token tokens reserved reserved_at_ms
--        used_tokens cost_micro lease_ttl_ms key_ttl_ms clock_ms
--   op: 0 admit, 1 settle (release the lease, real tokens, add the spend), 2 read
--   period: 0 day, 1 month (UTC, from Redis time)
-- REPLY: admitted reason wait_ms requests tokens inflight spent_micro reset_requests_ms
--        reset_tokens_ms period_end_ms reserved now_ms
--   reason: 0 admitted, 1 rpm, 2 tpm, 3 concurrency, 4 budget (wire.CLIENT_REASONS)

local K_CLIENT = KEYS[1]
local op = tonumber(ARGV[1])
local rpm, tpm, conc = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local budget, period = tonumber(ARGV[5]), tonumber(ARGV[6])
local token, tokens = ARGV[7], tonumber(ARGV[8])
local reserved, reserved_at = tonumber(ARGV[9]), tonumber(ARGV[10])
local used, cost = tonumber(ARGV[11]), tonumber(ARGV[12])
local lease_ttl = tonumber(ARGV[13])
local P = {key_ttl = tonumber(ARGV[14])}

local now = tonumber(ARGV[#ARGV])
if not now or now <= 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local found = redis.call('TYPE', K_CLIENT).ok
if found ~= 'none' and found ~= 'hash' then redis.call('DEL', K_CLIENT) end

local BUCKET_MS, SPAN = 1000, 61
local CONCURRENCY_WAIT_MS = 1000
local RPM, TPM, CONCURRENCY, BUDGET = 1, 2, 3, 4

local function slots_of(v)
  local slots = {}
  if not v then return slots end
  local oldest = math.floor(now / BUCKET_MS) - SPAN
  for b, r, t in string.gmatch(v, '(%d+):(%d+):(%d+)') do
    if tonumber(b) > oldest then slots[#slots + 1] = {tonumber(b), tonumber(r), tonumber(t)} end
  end
  return slots
end

local function encode(slots)
  local parts = {}
  for j, s in ipairs(slots) do parts[j] = string.format('%d:%d:%d', s[1], s[2], s[3]) end
  return table.concat(parts, ';')
end

-- How long until `over` of column `col` (2 requests, 3 tokens) has aged out.
local function wait_for(slots, col, over)
  local freed = 0
  for _, s in ipairs(slots) do
    freed = freed + s[col]
    if freed >= over then return (s[1] + SPAN) * BUCKET_MS - now end
  end
  return SPAN * BUCKET_MS
end

-- The first instant of the next budget period (UTC days from Redis time; months by the
-- civil-from-days algorithm, since Redis Lua has no os.date).
local function period_start(days_since_epoch)
  if period == 0 then return days_since_epoch end
  local z = days_since_epoch + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5)  -- day of month, 0-based
  return days_since_epoch - d
end

local today = math.floor(now / 86400000)
local this_period = period_start(today)
local function next_period_ms()
  if period == 0 then return (today + 1) * 86400000 end
  local day = today + 1
  while period_start(day) == this_period do day = day + 1 end  -- at most 31 steps
  return day * 86400000
end

local values = redis.call('HMGET', K_CLIENT, 'q', 'l', 'b')
local slots = slots_of(values[1] or nil)
local leases, live = {}, 0
for t, e in string.gmatch(values[2] or '', '([^ =]+)=(%d+)') do
  if tonumber(e) > now then
    leases[t] = tonumber(e)
    live = live + 1
  end
end
local spent = 0
if values[3] then
  local p, s = string.match(values[3], '^(%d+):(%d+)$')
  if p and tonumber(p) == this_period then spent = tonumber(s) end
end

local function totals()
  local r, t = 0, 0
  for _, s in ipairs(slots) do r, t = r + s[2], t + s[3] end
  return r, t
end

local function leases_value()
  local parts = {}
  for t, e in pairs(leases) do parts[#parts + 1] = t .. '=' .. string.format('%d', e) end
  return table.concat(parts, ' ')
end

local function write()
  redis.call('HSET', K_CLIENT, 'q', encode(slots), 'l', leases_value(),
    'b', string.format('%d:%d', this_period, spent))
  redis.call('PEXPIRE', K_CLIENT, P.key_ttl)
end

local function reply(admitted, reason, wait, reserve)
  local r, t = totals()
  local reset_r, reset_t = 0, 0
  if #slots > 0 then
    reset_r = wait_for(slots, 2, 1)
    reset_t = reset_r
  end
  return {admitted, reason, math.max(0, wait), r, t, live, spent, reset_r, reset_t,
          next_period_ms() - now, reserve, now}
end

if op == 2 then return reply(0, 0, 0, 0) end

if op == 1 then
  if leases[token] then
    leases[token] = nil
    live = live - 1
  end
  if reserved > 0 then
    -- Replace the estimate with the real usage in the bucket it was reserved in (given back
    -- only while that bucket still counts).
    local bucket = math.floor(reserved_at / BUCKET_MS)
    local delta = used - reserved
    local slot = nil
    for _, s in ipairs(slots) do if s[1] == bucket then slot = s end end
    if slot then
      slot[3] = math.max(0, slot[3] + delta)
    elseif delta > 0 then
      local current = math.floor(now / BUCKET_MS)
      slot = slots[#slots]
      if not slot or slot[1] ~= current then
        slot = {current, 0, 0}
        slots[#slots + 1] = slot
      end
      slot[3] = slot[3] + delta
    end
  end
  spent = spent + cost
  write()
  return reply(0, 0, 0, 0)
end

-- op 0: admit
local r, t = totals()
local reserve = 0
if tpm > 0 then reserve = math.min(math.max(tokens, 1), tpm) end
if budget > 0 and spent >= budget then
  return reply(0, BUDGET, next_period_ms() - now, 0)
end
if conc > 0 and live >= conc then return reply(0, CONCURRENCY, CONCURRENCY_WAIT_MS, 0) end
if rpm > 0 and r + 1 > rpm then return reply(0, RPM, wait_for(slots, 2, r + 1 - rpm), 0) end
if tpm > 0 and t + reserve > tpm then
  return reply(0, TPM, wait_for(slots, 3, t + reserve - tpm), 0)
end
local current = math.floor(now / BUCKET_MS)
local last = slots[#slots]
if not last or last[1] ~= current then
  last = {current, 0, 0}
  slots[#slots + 1] = last
end
last[2] = last[2] + 1
last[3] = last[3] + reserve
if conc > 0 then
  leases[token] = now + lease_ttl
  live = live + 1
end
write()
return reply(1, 0, 0, reserve)
