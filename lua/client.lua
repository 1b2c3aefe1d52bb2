-- client: one client key's limits (server.clients[]), admitted and settled atomically.
-- Standalone (no lib.lua): it touches two keys of its own, sharing the hash tag (one slot):
-- KEYS: client leases
--   client  hash {prefix:client:<name>}
--     'w'  requests/tokens per minute in 1 s buckets, as lib.lua's quota_* (a request counts
--          for its bucket and the 60 after it, so no minute anywhere holds more than the
--          limit): "<low>:<high>:<first>:<last>:<R>:<T>:<r>:<t>", the lowest stored bucket,
--          the highest of the older ones (-1: none), the first with a request (-1: none),
--          the newest, the totals of every stored bucket and the newest bucket's counts.
--     'o'  the older buckets, "<bucket>:<r>:<t>" joined by ';' (absent: none). An admit
--          within the newest bucket reads and writes 'w' alone; 'o' changes once a second
--          (a new bucket, the oldest aging out) and when a settle corrects an older bucket.
--     'b'  spend of the current budget period "<period>:<micro-USD>"
--   leases  zset {prefix:client:<name>}:l, member = lease token, score = expiry (ms): live
--          ones counted by score, expired ones dropped by score: a call costs O(log n) in
--          the client's concurrency, never a rewrite of every lease.
-- The previous format kept the minute in 'q' ("<bucket>:<r>:<t>;...") and the leases in 'l'
-- ("token=expiry ..."). A rolling upgrade meets both: this script reads them (counted with
-- the new fields), moves them into 'w'/'o' and the zset on its next write, and deletes them.
-- A replica still on the old script reads 'q'/'l' only, so it sees what old replicas
-- counted since the last migration, never a misread 'w'; the lease an old replica settles
-- after its migration stays counted until it expires (too many in flight for at most a
-- lease TTL, never too few).
-- edgeroute/clients.py (MemoryClients) is the reference model of the same rules.
-- ARGV: op rpm tpm max_concurrency budget_micro period token tokens reserved reserved_at_ms
--        used_tokens cost_micro lease_ttl_ms key_ttl_ms clock_ms
--   op: 0 admit, 1 settle (release the lease, real tokens, add the spend), 2 read
--   period: 0 day, 1 month (UTC, from Redis time)
-- REPLY: admitted reason wait_ms requests tokens inflight spent_micro reset_requests_ms
--        reset_tokens_ms period_end_ms reserved now_ms
--   reason: 0 admitted, 1 rpm, 2 tpm, 3 concurrency, 4 budget (wire.CLIENT_REASONS)

local K_CLIENT, K_LEASES = KEYS[1], KEYS[2]
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

-- A key of the wrong type (overwritten by hand, a stray client) would fail every call of the
-- client for good: the first command on each key goes through `repairing`, which replaces
-- such a key (and says so in Redis's log) and runs the command again, instead of a TYPE
-- before every call.
local function repairing(want, cmd, key, ...)
  local result = redis.pcall(cmd, key, ...)
  if type(result) ~= 'table' or not result.err then return result end
  -- (tostring: fakeredis hands the message over as a userdata)
  if string.sub(tostring(result.err), 1, 9) ~= 'WRONGTYPE' then
    return redis.call(cmd, key, ...)  -- any other error: raised as it is
  end
  redis.call('DEL', key)
  redis.log(redis.LOG_WARNING, 'edgeroute: replaced ' .. key .. ', not a ' .. want)
  return redis.call(cmd, key, ...)
end

local BUCKET_MS, SPAN = 1000, 61
local CONCURRENCY_WAIT_MS = 1000
local RPM, TPM, CONCURRENCY, BUDGET = 1, 2, 3, 4
local current = math.floor(now / BUCKET_MS)
local oldest = current - SPAN  -- this bucket and older ones no longer count
-- Whether this call renews the keys' TTLs: a call that may create a key, and the first
-- admit of each second (every second of traffic, not every request, for a 32-day TTL).
local refresh = false

-- ---- the minute window ----
-- A table {low, high, first, last, R, T, lr, lt} from 'w' (nil: no bucket), plus `older`
-- (the value of 'o', read on first need) and `moved` (older changed: write it back).

local HEADER = '^(%d+):(%-?%d+):(%-?%d+):(%d+):(%d+):(%d+):(%d+):(%d+)$'

local function window_of(v)
  if not v then return nil end
  local low, high, first, last, R, T, lr, lt = string.match(v, HEADER)
  if not low then return nil end  -- unreadable (or tampered): counted afresh, as a lost key
  return {low = tonumber(low), high = tonumber(high), first = tonumber(first),
          last = tonumber(last), R = tonumber(R), T = tonumber(T), lr = tonumber(lr),
          lt = tonumber(lt)}
end

local function header(w)
  return string.format('%d:%d:%d:%d:%d:%d:%d:%d', w.low, w.high, w.first, w.last, w.R, w.T,
    w.lr, w.lt)
end

local function older_of(w)
  if not w.older then w.older = redis.call('HGET', K_CLIENT, 'o') or '' end
  return w.older
end

-- Every stored bucket, in order, as {bucket, requests, tokens} (the slow paths only).
local function slots_of(w)
  local slots = {}
  if not w then return slots end
  for b, r, t in string.gmatch(older_of(w), '(%d+):(%d+):(%d+)') do
    slots[#slots + 1] = {tonumber(b), tonumber(r), tonumber(t)}
  end
  slots[#slots + 1] = {w.last, w.lr, w.lt}
  return slots
end

local function window_from(slots)
  if #slots == 0 then return nil end
  local last = slots[#slots]
  local w = {low = last[1], high = -1, first = -1, last = last[1], R = 0, T = 0,
             lr = last[2], lt = last[3], moved = true}
  local older = {}
  for j, s in ipairs(slots) do
    w.low, w.R, w.T = math.min(w.low, s[1]), w.R + s[2], w.T + s[3]
    if w.first < 0 and s[2] >= 1 then w.first = s[1] end
    if j < #slots then
      w.high = math.max(w.high, s[1])
      older[j] = string.format('%d:%d:%d', s[1], s[2], s[3])
    end
  end
  w.older = table.concat(older, ';')
  return w
end

-- Buckets that aged out leave (all at once: at most once a second for a busy client).
local function expire(w)
  if not w or w.low > oldest then return w end
  local live = {}
  for _, s in ipairs(slots_of(w)) do
    if s[1] > oldest then live[#live + 1] = s end
  end
  return window_from(live)
end

-- How long until `over` of column `col` (2 requests, 3 tokens) has aged out.
local function wait_for(w, col, over)
  local freed = 0
  for _, s in ipairs(slots_of(w)) do
    freed = freed + s[col]
    if freed >= over then return (s[1] + SPAN) * BUCKET_MS - now end
  end
  return SPAN * BUCKET_MS
end

-- wait_for(w, 2, 1) from the header: when the first request ages out.
local function first_request_wait(w)
  if not w then return 0 end
  if w.first < 0 then return SPAN * BUCKET_MS end
  return (w.first + SPAN) * BUCKET_MS - now
end

-- Count `dr` requests and `dt` tokens in the current bucket (a new newest one if it is not).
local function add_now(w, dr, dt)
  if not w then
    refresh = true
    w = {low = current, high = -1, first = -1, last = current, R = 0, T = 0, lr = 0, lt = 0,
         older = '', moved = true}
  elseif w.last ~= current then
    refresh = true
    local entry = string.format('%d:%d:%d', w.last, w.lr, w.lt)
    local older = older_of(w)
    w.older = (older == '' and entry) or (older .. ';' .. entry)
    w.moved = true
    w.high = math.max(w.high, w.last)
    w.last, w.lr, w.lt = current, 0, 0
    w.low = math.min(w.low, current)
  end
  if w.first < 0 and w.lr + dr >= 1 then w.first = current end
  w.lr, w.lt = w.lr + dr, w.lt + dt
  w.R, w.T = w.R + dr, w.T + dt
  return w
end

-- Where bucket `bucket` starts in `older` (its first entry), its counts and where it ends.
local function find_older(older, bucket)
  local key = string.format('%d:', bucket)
  local at = nil
  if string.sub(older, 1, #key) == key then
    at = 1
  else
    at = string.find(older, ';' .. key, 1, true)
    if at then at = at + 1 end
  end
  if not at then return nil end
  local r, t, stop = string.match(older, '^(%d+):(%d+)()', at + #key)
  return at, stop, tonumber(r), tonumber(t)
end

-- Replace a reservation with the real usage in the bucket it was reserved in (given back
-- only while that bucket still counts; more than reserved counts now if it does not). The
-- reference model corrects the first stored bucket of that number: the older ones come
-- first, and none of them can be it unless it lies in [low, high].
local function correct(w, bucket, delta)
  if w and bucket >= w.low and bucket <= w.high then
    local older = older_of(w)
    local at, stop, r, t = find_older(older, bucket)
    if at then
      local fixed = math.max(0, t + delta)
      w.older = string.sub(older, 1, at - 1) .. string.format('%d:%d:%d', bucket, r, fixed) ..
        string.sub(older, stop)
      w.moved = true
      w.T = w.T + fixed - t
      return w
    end
  end
  if w and w.last == bucket then
    local fixed = math.max(0, w.lt + delta)
    w.T, w.lt = w.T + fixed - w.lt, fixed
    return w
  end
  if delta > 0 then return add_now(w, 0, delta) end
  return w
end

-- ---- the budget period ----

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

-- ---- the upgrade from 'q' and 'l' (see the header) ----

-- The old minute's buckets merged into the window, bucket by bucket, oldest first.
local function merge_old_minute(w, old)
  local by_bucket, slots = {}, {}
  for _, s in ipairs(slots_of(w)) do
    by_bucket[s[1]] = s
    slots[#slots + 1] = s
  end
  for b, r, t in string.gmatch(old, '(%d+):(%d+):(%d+)') do
    b = tonumber(b)
    local s = by_bucket[b]
    if not s then
      s = {b, 0, 0}
      by_bucket[b] = s
      slots[#slots + 1] = s
    end
    s[2], s[3] = s[2] + tonumber(r), s[3] + tonumber(t)
  end
  table.sort(slots, function(x, y) return x[1] < y[1] end)
  return window_from(slots)
end

-- The old field's live leases, {token = expiry}: counted with the zset's, moved into it by
-- the call's write.
local function old_leases_of(old)
  local leases = {}
  for t, e in string.gmatch(old, '([^ =]+)=(%d+)') do
    if tonumber(e) > now then leases[t] = e end
  end
  return leases
end

-- ---- one call ----

local values = repairing('hash', 'HMGET', K_CLIENT, 'w', 'b', 'q', 'l')
if not (values[1] or values[2] or values[3] or values[4]) then refresh = true end
local w = window_of(values[1] or nil)
local upgrading = values[3] or values[4]
if upgrading then refresh = true end
if values[3] then w = merge_old_minute(w, values[3]) end
local old_leases = values[4] and old_leases_of(values[4]) or nil
w = expire(w)
local spent = 0
if values[2] then
  local p, s = string.match(values[2], '^(%d+):(%d+)$')
  if p and tonumber(p) == this_period then spent = tonumber(s) end
end

local function inflight()
  local n = repairing('zset', 'ZCOUNT', K_LEASES, '(' .. string.format('%d', now), '+inf')
  for _ in pairs(old_leases or {}) do n = n + 1 end
  return n
end

local function write_upgrade()
  local moved = false
  for t, e in pairs(old_leases or {}) do
    repairing('zset', 'ZADD', K_LEASES, e, t)
    moved = true
  end
  if moved then redis.call('PEXPIRE', K_LEASES, P.key_ttl) end
  old_leases = nil
  redis.call('HDEL', K_CLIENT, 'q', 'l')
end

-- A Redis out of memory checks only a script's first write (after one, every write goes
-- through): the first write of every call is this HSET, so such a Redis refuses the call
-- whole, and the replica counts it locally (edgeroute/clients.py) instead of half of it
-- landing here.
local function write()
  local b = string.format('%d:%d', this_period, spent)
  if not w then
    redis.call('HSET', K_CLIENT, 'b', b)
    if values[1] then redis.call('HDEL', K_CLIENT, 'w', 'o') end
  elseif w.moved and w.older ~= '' then
    redis.call('HSET', K_CLIENT, 'w', header(w), 'b', b, 'o', w.older)
  else
    redis.call('HSET', K_CLIENT, 'w', header(w), 'b', b)
    if w.moved then redis.call('HDEL', K_CLIENT, 'o') end
  end
  if upgrading then write_upgrade() end
  if refresh then redis.call('PEXPIRE', K_CLIENT, P.key_ttl) end
end

local function reply(admitted, reason, wait, reserve, live)
  local r, t = 0, 0
  if w then r, t = w.R, w.T end
  local reset = first_request_wait(w)
  return {admitted, reason, math.max(0, wait), r, t, live, spent, reset, reset,
          next_period_ms() - now, reserve, now}
end

if op == 2 then return reply(0, 0, 0, 0, inflight()) end

if op == 1 then
  if reserved > 0 then w = correct(w, math.floor(reserved_at / BUCKET_MS), used - reserved) end
  spent = spent + cost
  if old_leases then old_leases[token] = nil end
  write()
  repairing('zset', 'ZREM', K_LEASES, token)
  return reply(0, 0, 0, 0, inflight())
end

-- op 0: admit
local live = inflight()
local r, t = 0, 0
if w then r, t = w.R, w.T end
local reserve = 0
if tpm > 0 then reserve = math.min(math.max(tokens, 1), tpm) end
if budget > 0 and spent >= budget then
  return reply(0, BUDGET, next_period_ms() - now, 0, live)
end
if conc > 0 and live >= conc then return reply(0, CONCURRENCY, CONCURRENCY_WAIT_MS, 0, live) end
if rpm > 0 and r + 1 > rpm then return reply(0, RPM, wait_for(w, 2, r + 1 - rpm), 0, live) end
if tpm > 0 and t + reserve > tpm then
  return reply(0, TPM, wait_for(w, 3, t + reserve - tpm), 0, live)
end
w = add_now(w, 1, reserve)
write()
-- Leases of replicas that died (never settled) are not counted once expired (ZCOUNT by
-- score); they leave the set on the first admit of each second: O(log n + expired).
if refresh then redis.call('ZREMRANGEBYSCORE', K_LEASES, '-inf', string.format('%d', now)) end
if conc > 0 then
  live = live + redis.call('ZADD', K_LEASES, string.format('%d', now + lease_ttl), token)
  if refresh or live == 1 then redis.call('PEXPIRE', K_LEASES, P.key_ttl) end
end
return reply(1, 0, 0, reserve, live)
