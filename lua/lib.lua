-- edgeroute shared routing state: the library every script starts with.
--
-- The semantics are those of edgeroute/state/memory.py (the reference model); keep the two in
-- step. The order and meaning of every ARGV and reply field is edgeroute/state/wire.py; the
-- PARAMS/ARGV/REPLY lines of each script's header list the same names (a test checks them).
-- Keys of one route share the hash tag {prefix:route}, so every script touches one slot:
--   KEYS[1]  hash   per-target breaker record, one field per target id, plus '#rr' (cursor)
--   KEYS[2]  hash   per-target rolling window, one field per target id (sparse time buckets)
--   KEYS[3]  zset   in-flight leases, member '<target id>|<token>', score = expiry (ms)
-- A target record is "state gen failures half_open_ok open_until open_timeout cooldown_until
-- inflight", then " L<until>" while a learned provider limit holds (absent otherwise: records
-- written before it existed parse unchanged; probe tokens are lowercase hex, never 'L...'),
-- then " token=expiry" for each probe reservation it has handed out.
-- A target with provider quotas (rpm/tpm/max_concurrency) also has a field '#q:<id>' in
-- KEYS[2] (see quota_* below): a route's keys stay three, in one slot.
-- Redis TIME is the only clock in production: replicas may disagree about time, the state
-- never does. (The last ARGV of every script, clock_ms, is 0 then; tests set it.)
--
-- PARAMS: strategy w_cost w_latency w_reliability failure_threshold open_timeout_ms
--         success_threshold half_open_max_probes max_open_timeout_ms probe_ttl_ms bucket_ms
--         buckets lease_ttl_ms key_ttl_ms max_cooldown_ms half_life_ms explore_after_ms
--         explore_max explore_every explore_ttl_ms load_penalty tolerance within
--         breaker_scope affinity_ttl_ms max_pins

local CLOSED, OPEN, HALF_OPEN = 0, 1, 2
local SUCCESS, FAILURE, RATE_LIMITED, NEUTRAL = 0, 1, 2, 3

local K_TARGETS, K_WINDOW, K_LEASES = KEYS[1], KEYS[2], KEYS[3]

-- A key of the wrong type (overwritten by hand, a stray client) would fail every call on
-- the route for good: replace it, say so in Redis's log, and count it in the reply.
local REPAIRED = 0
local function repair(keys_types)
  for _, key_type in ipairs(keys_types) do
    local found = redis.call('TYPE', key_type[1]).ok
    if found ~= 'none' and found ~= key_type[2] then
      redis.call('DEL', key_type[1])
      redis.log(redis.LOG_WARNING, 'edgeroute: replaced ' .. key_type[1] .. ', a ' .. found ..
        ' where a ' .. key_type[2] .. ' belongs')
      REPAIRED = REPAIRED + 1
    end
  end
end
repair({{K_TARGETS, 'hash'}, {K_WINDOW, 'hash'}, {K_LEASES, 'zset'}})

-- The route's parameters, ARGV[1..ARG0], in PARAMS order.
local P = {
  strategy = tonumber(ARGV[1]),
  wc = tonumber(ARGV[2]), wl = tonumber(ARGV[3]), wr = tonumber(ARGV[4]),
  failure_threshold = tonumber(ARGV[5]),
  open_timeout = tonumber(ARGV[6]),
  success_threshold = tonumber(ARGV[7]),
  max_probes = tonumber(ARGV[8]),
  max_open_timeout = tonumber(ARGV[9]),
  probe_ttl = tonumber(ARGV[10]),
  bucket_ms = tonumber(ARGV[11]),
  buckets = tonumber(ARGV[12]),
  lease_ttl = tonumber(ARGV[13]),
  key_ttl = tonumber(ARGV[14]),
  max_cooldown = tonumber(ARGV[15]),
  half_life = tonumber(ARGV[16]),
  explore_after = tonumber(ARGV[17]),
  explore_max = tonumber(ARGV[18]),
  explore_every = tonumber(ARGV[19]),
  explore_ttl = tonumber(ARGV[20]),
  load_penalty = tonumber(ARGV[21]),
  tolerance = tonumber(ARGV[22]),
  within = tonumber(ARGV[23]),
  scope = tonumber(ARGV[24]),
  affinity_ttl = tonumber(ARGV[25]),
  max_pins = tonumber(ARGV[26]),
}
local ARG0 = 26

-- Keys after the first three, present only when the route uses them:
--   KEYS[4]  hash   breaker_scope provider: one breaker record per provider (field = the
--                   provider's name), shared by every route whose keys carry the same tag
--                   (config.py groups routes that share a provider under one tag)
--   next     zset   affinity: session pins, member = hash of the session key, score = expiry;
--                   the pinned target is the targets hash field '@<member>'
local K_PROV, K_PINS = nil, nil
local extra_keys = 4
if P.scope == 1 then
  K_PROV = KEYS[extra_keys]
  extra_keys = extra_keys + 1
end
if P.affinity_ttl > 0 then K_PINS = KEYS[extra_keys] end
if K_PROV then repair({{K_PROV, 'hash'}}) end
if K_PINS then repair({{K_PINS, 'zset'}}) end
-- In `records`, a provider's breaker record is keyed '#p:<provider>' ('#' is never part of
-- a target id). A target's breaker is its own record, or its provider's with scope provider.
local PB = '#p:'
local function breaker_id(id, provider)
  if K_PROV and provider and provider ~= '' then return PB .. provider end
  return id
end

-- Every script's last ARGV: 0 for Redis TIME, or a test clock in ms.
local function now_ms()
  local clock = tonumber(ARGV[#ARGV])
  if clock and clock > 0 then return clock end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local records = {}  -- id -> parsed record, loaded once per script run
local dirty = {}    -- ids whose record must be written back
local dirty_list = {}

local function parse(v)
  local r = {st = CLOSED, gen = 0, f = 0, ok = 0, u = 0, to = 0, cd = 0, inf = 0, lu = 0,
             probes = {}}
  if not v then return r end
  local st, gen, f, ok, u, to, cd, inf, rest = string.match(v,
    '^(%d+) (%d+) (%d+) (%d+) (%d+) (%d+) (%d+) (%-?%d+)(.*)$')
  if not st then return r end
  r.st, r.gen, r.f, r.ok = tonumber(st), tonumber(gen), tonumber(f), tonumber(ok)
  r.u, r.to, r.cd, r.inf = tonumber(u), tonumber(to), tonumber(cd), tonumber(inf)
  local lu, after = string.match(rest, '^ L(%d+)(.*)$')
  if lu then r.lu, rest = tonumber(lu), after end
  for token, expiry in string.gmatch(rest, ' ([^ =]+)=(%d+)') do
    r.probes[token] = tonumber(expiry)
  end
  return r
end

local function serialize(r)
  local parts = {string.format('%d %d %d %d %d %d %d %d',
    r.st, r.gen, r.f, r.ok, r.u, r.to, r.cd, r.inf)}
  if r.lu > 0 then parts[2] = 'L' .. string.format('%d', r.lu) end
  for token, expiry in pairs(r.probes) do
    parts[#parts + 1] = string.format('%s=%d', token, expiry)
  end
  return table.concat(parts, ' ')
end

local function touch(id)
  if not dirty[id] then
    dirty[id] = true
    dirty_list[#dirty_list + 1] = id
  end
end

local function load(id)
  local r = records[id]
  if not r then
    if string.sub(id, 1, #PB) == PB then
      r = parse(redis.call('HGET', K_PROV, string.sub(id, #PB + 1)))
    else
      r = parse(redis.call('HGET', K_TARGETS, id))
    end
    records[id] = r
  end
  return r
end

-- The three keys of a route exist together and share one lifetime: during a Redis Cluster
-- slot migration a script whose keys are partly missing on a node is refused (TRYAGAIN),
-- while one whose keys all exist follows the ASK redirection. So the window hash and the
-- lease set each hold a placeholder member '#' (never a target id: ids never contain '#'
-- alone, and lease members always contain '|'), and every write refreshes all three TTLs.
-- Once per script run: a batch of decides or outcomes refreshes them once, not per write.
local kept = false
local function keep_together()
  if kept then return end
  kept = true
  redis.call('HSET', K_WINDOW, '#', 1)
  redis.call('ZADD', K_LEASES, 'inf', '#')
  redis.call('PEXPIRE', K_TARGETS, P.key_ttl)
  redis.call('PEXPIRE', K_WINDOW, P.key_ttl)
  redis.call('PEXPIRE', K_LEASES, P.key_ttl)
  if K_PROV then
    redis.call('HSET', K_PROV, '#', 1)
    redis.call('PEXPIRE', K_PROV, P.key_ttl)
  end
  if K_PINS then
    redis.call('ZADD', K_PINS, 'inf', '#')
    redis.call('PEXPIRE', K_PINS, P.key_ttl)
  end
end

-- The time-decayed estimate of a target lives in the targets hash under '<id>#e' ('#' is
-- never part of a target id): "t tl w ws ls wf" - the last sample, the last success and
-- since when it has had requests in flight without an answer (ms, -1: none), then the
-- decayed success count, latency sum (us) and failure count as of t
-- (floats as %.17g, which round-trips exactly) - followed by " token=expiry" for each
-- exploration reservation. Semantics: memory.py `_add_estimate`, `_Target.estimate`.
local estimates = {}  -- id -> parsed estimate
local est_dirty = {}
local est_dirty_list = {}

local function parse_est(v)
  local e = {t = -1, tl = -1, w = -1, ws = 0, ls = 0, wf = 0, x = {}}
  if not v then return e end
  local t, tl, w, ws, ls, wf, rest = string.match(v,
    '^(%-?%d+) (%-?%d+) (%-?%d+) (%S+) (%S+) (%S+)(.*)$')
  if not t then return e end
  e.t, e.tl, e.w = tonumber(t), tonumber(tl), tonumber(w)
  e.ws, e.ls, e.wf = tonumber(ws), tonumber(ls), tonumber(wf)
  for token, expiry in string.gmatch(rest, ' ([^ =]+)=(%d+)') do
    e.x[token] = tonumber(expiry)
  end
  return e
end

local function serialize_est(e)
  local parts = {string.format('%d %d %d %.17g %.17g %.17g', e.t, e.tl, e.w, e.ws, e.ls,
    e.wf)}
  for token, expiry in pairs(e.x) do
    parts[#parts + 1] = string.format('%s=%d', token, expiry)
  end
  return table.concat(parts, ' ')
end

local function touch_est(id)
  if not est_dirty[id] then
    est_dirty[id] = true
    est_dirty_list[#est_dirty_list + 1] = id
  end
end

local function load_est(id)
  local e = estimates[id]
  if not e then
    e = parse_est(redis.call('HGET', K_TARGETS, id .. '#e'))
    estimates[id] = e
  end
  return e
end

-- (latency us or -1, error rate, age ms or -1): ratios of equally decayed sums.
local function estimate(e, now)
  local lat, err, age = -1, 0, -1
  if e.ws > 0 then
    lat = e.ls / e.ws
    age = now - e.tl
  end
  if e.ws + e.wf > 0 then err = e.wf / (e.ws + e.wf) end
  return lat, err, age
end

-- How long a target with `inf` in flight has returned nothing (ms; 0 when idle).
local function waiting(e, inf, now)
  if inf > 0 and e.w >= 0 then return now - e.w end
  return 0
end

-- Drop expired exploration reservations (when `id` is given); return how many are live.
local function live_explores(e, id, now)
  local count = 0
  for token, expiry in pairs(e.x) do
    if expiry <= now then
      if id then
        e.x[token] = nil
        touch_est(id)
      end
    else
      count = count + 1
    end
  end
  return count
end

-- Decay the sums to `now` (half-life), then add the sample. An exploration's success
-- replaces the latency estimate: it was re-measured because the old one was stale.
local function add_estimate(id, now, kind, lat_us, explored)
  local e = load_est(id)
  if e.t >= 0 and now > e.t then
    local decay = 0.5 ^ ((now - e.t) / P.half_life)
    e.ws = e.ws * decay
    e.ls = e.ls * decay
    e.wf = e.wf * decay
  end
  if kind == SUCCESS then
    if explored then
      e.ws = 0
      e.ls = 0
    end
    e.ws = e.ws + 1
    e.ls = e.ls + lat_us
    e.tl = now
  else
    e.wf = e.wf + 1
  end
  if now > e.t then e.t = now end
  e.w = now  -- an answer: whatever is still out was sent before now
  touch_est(id)
end

-- Write every changed record back in one HSET; `extra` adds more field/value pairs.
local flush_windows  -- (below, with the windows it writes)
local function flush(extra)
  flush_windows()
  local args, shared = {}, {}
  for _, id in ipairs(dirty_list) do
    if string.sub(id, 1, #PB) == PB then
      shared[#shared + 1] = string.sub(id, #PB + 1)
      shared[#shared + 1] = serialize(records[id])
    else
      args[#args + 1] = id
      args[#args + 1] = serialize(records[id])
    end
  end
  if #shared > 0 then
    redis.call('HSET', K_PROV, unpack(shared))
    if #args == 0 then keep_together() end
  end
  for _, id in ipairs(est_dirty_list) do
    args[#args + 1] = id .. '#e'
    args[#args + 1] = serialize_est(estimates[id])
  end
  if extra then
    for _, v in ipairs(extra) do args[#args + 1] = v end
  end
  if #args > 0 then
    redis.call('HSET', K_TARGETS, unpack(args))
    keep_together()
  end
end

local function open_breaker(r, id, now, timeout)
  r.st = OPEN
  r.gen = r.gen + 1
  r.f = 0
  r.ok = 0
  r.to = timeout
  r.u = now + timeout
  r.probes = {}
  touch(id)
end

local function half_open_if_due(r, id, now)
  if r.st == OPEN and now >= r.u then
    r.st = HALF_OPEN
    r.gen = r.gen + 1
    r.ok = 0
    r.probes = {}
    touch(id)
  end
end

-- Drop expired probe reservations; return how many are live and the earliest expiry.
local function live_probes(r, id, now)
  local count, earliest = 0, nil
  for token, expiry in pairs(r.probes) do
    if expiry <= now then
      r.probes[token] = nil
      touch(id)
    else
      count = count + 1
      if not earliest or expiry < earliest then earliest = expiry end
    end
  end
  return count, earliest
end

-- Leases whose replica never reported back stop counting as in flight. A dry run (explain)
-- changes nothing: it counts live leases itself.
local function expire_leases(now, dry)
  if dry then return end
  local expired = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now)
  if #expired == 0 then return end
  for _, member in ipairs(expired) do
    local id = string.match(member, '^(.*)|[^|]*$')
    if id then
      local r = load(id)
      r.inf = r.inf - 1
      touch(id)
    end
  end
  redis.call('ZREMRANGEBYSCORE', K_LEASES, '-inf', now)
end

-- In-flight counts live in the target records, the leases in K_LEASES; a lost key (eviction,
-- a stray DEL) must not leave them disagreeing. ZCOUNT is O(log n): only when the total differs
-- are the leases counted again per target (leases of targets this route no longer lists
-- keep the totals apart until they expire; the recount then simply runs each time).
local function lease_counts()
  local counts = {}
  for _, member in ipairs(redis.call('ZRANGE', K_LEASES, 0, -1)) do
    local id = string.match(member, '^(.*)|[^|]*$')
    if id then counts[id] = (counts[id] or 0) + 1 end
  end
  return counts
end

local function reconcile_inflight(ids)
  local total = 0
  for _, id in ipairs(ids) do total = total + records[id].inf end
  -- Every lease expires at a finite time; only the placeholder '#' scores +inf.
  local leases = redis.call('ZCOUNT', K_LEASES, '-inf', '(inf')
  if total == leases then return end
  local counts = lease_counts()
  for _, id in ipairs(ids) do
    local r = records[id]
    local held = counts[id] or 0
    if r.inf ~= held then
      r.inf = held
      touch(id)
    end
  end
end

-- A window field is "<first>:<last>:<S>:<L>:<F>:<I>:<O>|<older slots>|<s>:<l>:<f>:<i>:<o>":
-- a header with the oldest and newest bucket and the totals of every stored bucket; the
-- older buckets as "<bucket>:<s>:<l>:<f>:<i>:<o>" joined by ';'; and the newest bucket's
-- counts on their own. While the oldest bucket is inside the window, the header alone is
-- the answer (a decide reads the header totals, not twelve buckets), and a sample for the
-- newest bucket changes only the header and the last section.
-- A script run parses each window it touches once (`win`) and `flush` writes the changed
-- ones back once: a batch of decides and outcomes on the same targets costs one parse and
-- one encoding per target, not one per sample. Parsed, a window is
-- {first, last, S, L, F, I, O, older, s, l, f, i, o}: numbers, but for `older`, the older
-- buckets' text, which the common case never needs to read.
local SLOT = '(%d+):(%d+):(%d+):(%d+):(%d+):(%d+)'
local WINDOW = '^(%d+):(%d+):(%d+):(%d+):(%d+):(%d+):(%d+)|([^|]*)|(%d+):(%d+):(%d+):(%d+):(%d+)$'

local win = {}  -- id -> parsed window, or false: none (nil: not read yet)
local win_dirty, win_dirty_list = {}, {}
-- Quota fields ('#q:<id>', below) are kept the same way, as their text: id -> value or false.
local quotas_seen = {}
local quota_dirty, quota_dirty_list = {}, {}

local function parse_window(v)
  if not v then return false end
  local first, last, s, l, f, ti, to, older, ls, ll, lf, li, lo = string.match(v, WINDOW)
  if not first then return false end  -- unreadable: as if empty (rewritten at the next sample)
  return {tonumber(first), tonumber(last), tonumber(s), tonumber(l), tonumber(f),
          tonumber(ti), tonumber(to), older, tonumber(ls), tonumber(ll), tonumber(lf),
          tonumber(li), tonumber(lo)}
end

local function encode_window(w)
  return string.format('%d:%d:%d:%d:%d:%d:%d|', w[1], w[2], w[3], w[4], w[5], w[6], w[7])
    .. w[8] .. string.format('|%d:%d:%d:%d:%d', w[9], w[10], w[11], w[12], w[13])
end

local function window_of(id)
  local w = win[id]
  if w == nil then
    w = parse_window(redis.call('HGET', K_WINDOW, id))
    win[id] = w
  end
  return w
end

-- The windows of `ids` not read yet, in one call.
local function window_prefetch(ids)
  local missing = {}
  for _, id in ipairs(ids) do
    if win[id] == nil then missing[#missing + 1] = id end
  end
  if #missing == 0 then return end
  local got = redis.call('HMGET', K_WINDOW, unpack(missing))
  for j, id in ipairs(missing) do win[id] = parse_window(got[j]) end
end

local function window_put(id, w)
  win[id] = w
  if not win_dirty[id] then
    win_dirty[id] = true
    win_dirty_list[#win_dirty_list + 1] = id
  end
end

-- Every bucket of a parsed window, oldest first, as {bucket, s, l, f, i, o}.
local function window_slots(w)
  local slots = {}
  for b, bs, bl, bf, bi, bo in string.gmatch(w[8], SLOT) do
    slots[#slots + 1] = {tonumber(b), tonumber(bs), tonumber(bl), tonumber(bf), tonumber(bi),
      tonumber(bo)}
  end
  slots[#slots + 1] = {w[2], w[9], w[10], w[11], w[12], w[13]}
  return slots
end

local function window_live(slots, oldest)
  local live = {}
  for _, slot in ipairs(slots) do
    if slot[1] > oldest then live[#live + 1] = slot end
  end
  return live
end

local function window_sums(slots)
  local t = {0, 0, 0, 0, 0}
  for _, slot in ipairs(slots) do
    for j = 1, 5 do t[j] = t[j] + slot[j + 1] end
  end
  return t
end

-- A parsed window of a non-empty list of buckets, oldest first.
local function window_from_slots(slots)
  local t = window_sums(slots)
  local older = {}
  for j = 1, #slots - 1 do
    local slot = slots[j]
    older[j] = string.format('%d:%d:%d:%d:%d:%d', slot[1], slot[2], slot[3], slot[4], slot[5],
      slot[6])
  end
  local last = slots[#slots]
  return {slots[1][1], last[1], t[1], t[2], t[3], t[4], t[5], table.concat(older, ';'),
          last[2], last[3], last[4], last[5], last[6]}
end

-- Totals of the live buckets of window `w` (parsed). With `id` given (a writing script), a
-- window holding stale buckets is rewritten without them, so the next read is the header.
local function window_totals(w, now, id)
  if not w then return 0, 0, 0, 0, 0 end
  local oldest = math.floor(now / P.bucket_ms) - P.buckets
  if w[1] > oldest then return w[3], w[4], w[5], w[6], w[7] end
  local live = window_live(window_slots(w), oldest)
  if id then
    if #live > 0 then
      window_put(id, window_from_slots(live))
    else
      window_put(id, false)
    end
  end
  local t = window_sums(live)
  return t[1], t[2], t[3], t[4], t[5]
end

local function add_sample(id, now, kind, lat_us, tin, tout)
  local bucket = math.floor(now / P.bucket_ms)
  local oldest = bucket - P.buckets
  local ds, dl, df = 0, 0, 1
  if kind == SUCCESS then ds, dl, df = 1, lat_us, 0 end
  local w = window_of(id)
  if w and w[1] > oldest and w[2] == bucket then
    -- The common case: another sample for the newest bucket and nothing stale.
    w[3], w[4], w[5], w[6], w[7] = w[3] + ds, w[4] + dl, w[5] + df, w[6] + tin, w[7] + tout
    w[9], w[10], w[11] = w[9] + ds, w[10] + dl, w[11] + df
    w[12], w[13] = w[12] + tin, w[13] + tout
    window_put(id, w)
  else
    local slots = {}
    if w then slots = window_live(window_slots(w), oldest) end
    local newest = slots[#slots]
    if newest and newest[1] == bucket then
      newest[2], newest[3], newest[4] = newest[2] + ds, newest[3] + dl, newest[4] + df
      newest[5], newest[6] = newest[5] + tin, newest[6] + tout
    else
      slots[#slots + 1] = {bucket, ds, dl, df, tin, tout}
    end
    window_put(id, window_from_slots(slots))
  end
  keep_together()
end

-- Write the windows and quota counts this run changed (flush's part for K_WINDOW).
function flush_windows()
  if #win_dirty_list == 0 and #quota_dirty_list == 0 then return end
  local set, gone = {}, {}
  for _, id in ipairs(win_dirty_list) do
    local w = win[id]
    if w then
      set[#set + 1] = id
      set[#set + 1] = encode_window(w)
    else
      gone[#gone + 1] = id
    end
  end
  for _, id in ipairs(quota_dirty_list) do
    set[#set + 1] = '#q:' .. id
    set[#set + 1] = quotas_seen[id]
  end
  quota_dirty_list = {}
  quota_dirty = {}
  if #set > 0 then redis.call('HSET', K_WINDOW, unpack(set)) end
  if #gone > 0 then redis.call('HDEL', K_WINDOW, unpack(gone)) end
  win_dirty_list = {}
  win_dirty = {}
  keep_together()
end

-- The target holding the lease `token`, for a client that never learnt which one it was
-- (its decide timed out, yet ran). Rare: only then is the lease set scanned.
local function lease_holder(token)
  local cursor = '0'
  repeat
    local page = redis.call('ZSCAN', K_LEASES, cursor, 'MATCH', '*|' .. token, 'COUNT', 500)
    cursor = page[1]
    if #page[2] > 0 then return string.match(page[2][1], '^(.*)|[^|]*$') end
  until cursor == '0'
  return nil
end

-- ---- provider quotas (targets[].rpm, tpm, max_concurrency) ---------------------------------
-- Requests and tokens per minute are counted in 1 s buckets. A request counts for the bucket
-- it was admitted in and the 60 after it (61 s, not 60): then every 60 s interval, wherever it
-- starts, lies inside what each admission counted, so the fleet never exceeds a quota in any
-- minute (it may admit slightly less than a provider's own window would; never more).
-- The field '#q:<id>' holds "<first>:<last>:<R>:<T>|<older>|<r>:<t>": the oldest and newest
-- bucket, the totals of all stored buckets, older buckets as "<bucket>:<r>:<t>" joined by ';'
-- and the newest bucket's counts: while the oldest bucket still counts, the header is the
-- answer, as for the latency window above.
local Q_BUCKET_MS, Q_SPAN = 1000, 61
-- After a failed concurrency check nothing says when a lease comes back: ask again in 1 s.
local Q_CONCURRENCY_WAIT_MS = 1000
local QHEAD = '^(%d+):(%d+):(%d+):(%d+)|'
local QVALUE = QHEAD .. '([^|]*)|(%d+):(%d+)$'

local function quota_field(id) return '#q:' .. id end

-- A target's quota counts as of this run (read once, written back by flush).
local function quota_value(id)
  local v = quotas_seen[id]
  if v == nil then
    v = redis.call('HGET', K_WINDOW, quota_field(id)) or false
    quotas_seen[id] = v
  end
  return v or nil
end

-- The quota counts of `ids` not read yet, in one call.
local function quota_prefetch(ids)
  local missing, fields = {}, {}
  for _, id in ipairs(ids) do
    if quotas_seen[id] == nil then
      missing[#missing + 1] = id
      fields[#fields + 1] = quota_field(id)
    end
  end
  if #missing == 0 then return end
  local got = redis.call('HMGET', K_WINDOW, unpack(fields))
  for j, id in ipairs(missing) do quotas_seen[id] = got[j] or false end
end

-- Live buckets of a quota value, oldest first, as {bucket, requests, tokens}.
local function quota_slots(v, now)
  local slots = {}
  if not v then return slots end
  local _, last, _, _, older, lr, lt = string.match(v, QVALUE)
  if not last then return slots end
  local oldest = math.floor(now / Q_BUCKET_MS) - Q_SPAN
  for b, br, bt in string.gmatch(older, '(%d+):(%d+):(%d+)') do
    if tonumber(b) > oldest then
      slots[#slots + 1] = {tonumber(b), tonumber(br), tonumber(bt)}
    end
  end
  if tonumber(last) > oldest then
    slots[#slots + 1] = {tonumber(last), tonumber(lr), tonumber(lt)}
  end
  return slots
end

local function quota_encode(slots)
  local R, T, older = 0, 0, {}
  for j, slot in ipairs(slots) do
    R, T = R + slot[2], T + slot[3]
    if j < #slots then older[j] = string.format('%d:%d:%d', slot[1], slot[2], slot[3]) end
  end
  local last = slots[#slots]
  return string.format('%d:%d:%d:%d|', slots[1][1], last[1], R, T) .. table.concat(older, ';')
    .. string.format('|%d:%d', last[2], last[3])
end

-- Requests and tokens counted against a quota at `now`.
local function quota_totals(v, now)
  if not v then return 0, 0 end
  local first, _, R, T = string.match(v, QHEAD)
  if first and tonumber(first) > math.floor(now / Q_BUCKET_MS) - Q_SPAN then
    return tonumber(R), tonumber(T)
  end
  local r, t = 0, 0
  for _, slot in ipairs(quota_slots(v, now)) do r, t = r + slot[2], t + slot[3] end
  return r, t
end

-- How long until `over` requests (column 2) or tokens (column 3) have aged out.
local function quota_wait(v, now, col, over)
  local freed = 0
  for _, slot in ipairs(quota_slots(v, now)) do
    freed = freed + slot[col]
    if freed >= over then return (slot[1] + Q_SPAN) * Q_BUCKET_MS - now end
  end
  return Q_SPAN * Q_BUCKET_MS
end

-- The tokens an admission reserves: the estimate, at least 1, at most the whole quota (a
-- request larger than a provider's minute still goes out, alone).
local function quota_reserve(q, tokens)
  if q.tpm <= 0 then return 0 end
  return math.min(math.max(tokens, 1), q.tpm)
end

-- Why a target with quotas `q` is out (a wire.EXCLUSION_REASONS code), for how long; 0 if in.
local QUOTA_CONCURRENCY, QUOTA_RPM, QUOTA_TPM = 4, 5, 6
local function quota_check(q, inflight, v, now, tokens)
  if q.conc > 0 and inflight >= q.conc then return QUOTA_CONCURRENCY, Q_CONCURRENCY_WAIT_MS end
  local R, T = quota_totals(v, now)
  if q.rpm > 0 and R + 1 > q.rpm then return QUOTA_RPM, quota_wait(v, now, 2, R + 1 - q.rpm) end
  local need = quota_reserve(q, tokens)
  if q.tpm > 0 and T + need > q.tpm then
    return QUOTA_TPM, quota_wait(v, now, 3, T + need - q.tpm)
  end
  return 0, 0
end

-- Count one admitted request and its reserved tokens (`dt` may be negative: a correction).
local function quota_add(id, v, now, dr, dt, at)
  local slots = quota_slots(v, now)
  local bucket = math.floor(at / Q_BUCKET_MS)
  local slot = nil
  for _, s in ipairs(slots) do if s[1] == bucket then slot = s end end
  if not slot then
    if dt < 0 then return end  -- the reservation already aged out: nothing to give back
    bucket = math.floor(now / Q_BUCKET_MS)
    slot = slots[#slots]
    if not slot or slot[1] ~= bucket then
      slot = {bucket, 0, 0}
      slots[#slots + 1] = slot
    end
  end
  slot[2] = slot[2] + dr
  slot[3] = math.max(0, slot[3] + dt)
  quotas_seen[id] = quota_encode(slots)
  if not quota_dirty[id] then
    quota_dirty[id] = true
    quota_dirty_list[#quota_dirty_list + 1] = id
  end
end

-- One finished attempt (ARGV fields in the order the Python side packs them).
local function apply(now, id, kind, lat_us, gen, token, probe, retry_after, tin, tout,
                     reserved, reserved_at, limit_reset, provider)
  if id == '' then
    -- (no provider either: with scope provider such a probe reservation simply expires)
    id = lease_holder(token)
    if not id then return end
  end
  local r = load(id)
  -- The breaker fields (st gen f ok u to probes) live in `b`: the target's own record, or
  -- its provider's (scope provider); cooldowns, limits and in-flight counts stay in `r`.
  local bid = breaker_id(id, provider)
  local b = load(bid)
  half_open_if_due(b, bid, now)
  if token ~= '' then
    if redis.call('ZREM', K_LEASES, id .. '|' .. token) == 1 then
      r.inf = r.inf - 1
      touch(id)
    end
    if probe == 1 and b.probes[token] then
      b.probes[token] = nil
      touch(bid)
    end
  end
  local explored = false
  if token ~= '' then
    local e = load_est(id)
    if e.x[token] then
      e.x[token] = nil
      touch_est(id)
      explored = true
    end
  end
  if kind ~= NEUTRAL then
    add_sample(id, now, kind, lat_us, tin, tout)
    add_estimate(id, now, kind, lat_us, explored)
  end
  if kind == RATE_LIMITED and retry_after > 0 then
    -- A later, shorter Retry-After never shortens a cooldown already in force; none outlives
    -- the record that holds it (RouteSpec.max_cooldown_ms).
    local until_ms = now + math.min(retry_after, P.max_cooldown)
    if until_ms > r.cd then
      r.cd = until_ms
      touch(id)
    end
  end
  if limit_reset > 0 then
    -- A provider said its remaining requests or tokens are 0 until this reset (learned from
    -- its rate-limit headers): out fleet-wide until then, bounded like a cooldown.
    local until_ms = now + math.min(limit_reset, P.max_cooldown)
    if until_ms > r.lu then
      r.lu = until_ms
      touch(id)
    end
  end
  if reserved > 0 then
    -- The tokens reserved at decide were an estimate: replace it with the real usage when
    -- the provider reported it, or give it back when the provider served nothing.
    local used = tin + tout
    if used > 0 or kind == FAILURE or kind == RATE_LIMITED then
      quota_add(id, quota_value(id), now, 0, used - reserved,
        reserved_at)
      keep_together()
    end
  end
  if gen ~= -1 and gen ~= b.gen then return end  -- admitted before a transition: too late
  if b.st == CLOSED then
    if kind == SUCCESS then
      if b.f ~= 0 then
        b.f = 0
        touch(bid)
      end
    elseif kind == FAILURE then
      b.f = b.f + 1
      touch(bid)
      if b.f >= P.failure_threshold then open_breaker(b, bid, now, P.open_timeout) end
    end
  elseif b.st == HALF_OPEN then
    if kind == SUCCESS then
      b.ok = b.ok + 1
      touch(bid)
      if b.ok >= P.success_threshold then
        b.st = CLOSED
        b.gen = b.gen + 1
        b.f = 0
        b.ok = 0
        b.to = 0
        b.probes = {}
      end
    elseif kind == FAILURE then
      local previous = b.to
      if previous == 0 then previous = P.open_timeout end
      open_breaker(b, bid, now, math.min(previous * 2, P.max_open_timeout))
    end
  end
end

-- Outcome fields start at ARGV[i], in wire.OUTCOME_FIELDS order:
--   target_id kind latency_us generation token probe retry_after_ms input_tokens output_tokens
--          reserved_tokens reserved_at_ms limit_reset_ms provider
local OUTCOME_FIELDS = 13
local function apply_argv(now, i)
  apply(now, ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]),
    ARGV[i + 4], tonumber(ARGV[i + 5]), tonumber(ARGV[i + 6]), tonumber(ARGV[i + 7]),
    tonumber(ARGV[i + 8]), tonumber(ARGV[i + 9]), tonumber(ARGV[i + 10]),
    tonumber(ARGV[i + 11]), ARGV[i + 12])
end
