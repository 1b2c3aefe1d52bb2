-- decide: for each of a batch of requests on one route, in order, rank the route's
-- admissible targets and admit the first, atomically; or, in explain mode (a batch of one),
-- rank them as the next request would and report every target, changing nothing.
-- ARGV: n *(target_id price priority weight provider) q *(position rpm tpm max_concurrency)
--        b *[request] clock_ms
--   (static route data first, so the client can send it pre-encoded; priority is the
--   target's group for strategy priority, weight its share for weighted, provider its breaker's
--   with breaker_scope provider, else empty; the quota group lists
--   only targets that have quotas, by 1-based position, 0 meaning no such limit)
--   request: mode token limit tokens session m *(excluded_id) has_outcome [outcome]
--   mode: 0 decide, 1 decide and advance the round-robin cursor, 2 explain
--   session: a hash of the request's session key (affinity), or empty
--   tokens: this request's estimated tokens, reserved against a target's tpm
--   Requests that arrive together (concurrent decides of one route on one replica) share
--   one run: the route's records are read, parsed and written back once, and each request
--   sees every change the ones before it made, exactly as separate runs in that order would.
-- REPLY: *[reply]
--   reply (one per request, in order): admitted generation probe wait_ms rr_cursor count
--        admissible now_ms repaired reserved quota_limited affinity pin_from pins
--        *[candidate] *[target] (explain)
--   candidate (best first, `count` of them): position state score successes latency_us
--     failures inflight held estimate_us error_rate estimate_age_ms explore waiting_ms credit
--     (scores and estimates travel as strings: Redis truncates Lua numbers)
--   target (explain only, configuration order): state generation consecutive_failures
--     half_open_successes open_remaining_ms open_timeout_ms cooldown_remaining_ms inflight
--     probes_in_use successes failures latency_us input_tokens output_tokens excluded
--     excluded_ms estimate_us error_rate estimate_age_ms explorations_in_use stale
--     waiting_ms current_weight
--   rr_cursor is the cursor the next advancing decide takes (explain) or the one this decide
--   took (round-robin, and the turn among near-best targets for latency and hybrid);
--   excluded is a wire.EXCLUSION_REASONS code, excluded_ms how long it still holds.
--   reserved: the tokens this admission reserved (corrected at record); quota_limited: 1
--   when nothing was admitted and a quota or a learned limit kept a target out (a 429).
--   affinity: wire.AFFINITY_STATES code of this request's pin; pin_from: the position of
--   the target a moved pin left (0: none); pins: live pins of the route (explain only).
--   repaired is reported by the first reply of a batch (the keys are checked once per run).

local COST, LATENCY, HYBRID, ROUND_ROBIN, LEAST_BUSY, PRIORITY, WEIGHTED = 0, 1, 2, 3, 4, 5, 6

local now = now_ms()
local n = tonumber(ARGV[ARG0 + 1])
local i = ARG0 + 2
local ids, prices, groups, weights, bids = {}, {}, {}, {}, {}
for k = 1, n do
  ids[k] = ARGV[i]
  prices[k] = tonumber(ARGV[i + 1])
  groups[k] = tonumber(ARGV[i + 2])
  weights[k] = tonumber(ARGV[i + 3])
  bids[k] = breaker_id(ARGV[i], ARGV[i + 4])
  i = i + 5
end
local quotas = {}  -- position -> {rpm, tpm, conc}
local q = tonumber(ARGV[i])
i = i + 1
for _ = 1, q do
  quotas[tonumber(ARGV[i])] = {rpm = tonumber(ARGV[i + 1]), tpm = tonumber(ARGV[i + 2]),
                               conc = tonumber(ARGV[i + 3])}
  i = i + 4
end
local batch = tonumber(ARGV[i])
i = i + 1
-- Explain changes nothing and travels alone: its mode is the first request's.
local explain = tonumber(ARGV[i]) == 2

local strategy = P.strategy
-- What scores the targets and moves the cursor: priority's `within`, else the strategy.
local kind = strategy
if strategy == PRIORITY then kind = P.within end
local windowed = kind == LATENCY or kind == HYBRID
local weighted = strategy == WEIGHTED

-- Load every target record, the cursor, the last exploration's cursor, (latency, hybrid,
-- explain) every estimate and (weighted, explain) the round-robin weights in one call, once
-- for the whole batch: from here on they live in `records` and `estimates` (lib.lua) and the
-- route-level values below, and are written back once, by `flush`.
local fields = {'#rr', '#x'}
for k = 1, n do fields[k + 2] = ids[k] end
if windowed or explain then
  for k = 1, n do fields[n + k + 2] = ids[k] .. '#e' end
end
local SW = #fields + 1
if weighted or explain then fields[SW] = '#sw' end
local values = redis.call('HMGET', K_TARGETS, unpack(fields))
local rr = tonumber(values[1]) or 0
local rr_loaded = rr
local last_explore = tonumber(values[2])
local explore_moved = false
for k = 1, n do records[ids[k]] = parse(values[k + 2]) end
if K_PROV then
  -- breaker_scope provider: the providers' shared breaker records, in one call.
  local names, seen = {}, {}
  for k = 1, n do
    if bids[k] ~= ids[k] and not seen[bids[k]] then
      seen[bids[k]] = true
      names[#names + 1] = string.sub(bids[k], #PB + 1)
    end
  end
  if #names > 0 then
    local got = redis.call('HMGET', K_PROV, unpack(names))
    for j, name in ipairs(names) do records[PB .. name] = parse(got[j]) end
  end
end
if windowed or explain then
  for k = 1, n do estimates[ids[k]] = parse_est(values[n + k + 2]) end
end
-- strategy weighted: '#sw' holds each target's smooth weighted round-robin current weight,
-- "<weight>|<id>" joined by spaces (absent: 0). memory.py `_swrr_step`.
local current = {}
local current_moved = false
if (weighted or explain) and values[SW] then
  for w, id in string.gmatch(values[SW], '(%-?%d+)|(%S+)') do current[id] = tonumber(w) end
end
-- Session pins this batch set, written back by `flush` ('@<member>' -> target id); a pin
-- dropped later in the batch (expired, or evicted past max_pins) is forgotten here too.
local pins_set = {}

local function by_score(a, b)
  if a.score ~= b.score then return a.score > b.score end
  return a.idx < b.idx
end

-- strategy.py: _loaded_latencies, _score_latency, _score_hybrid, _share, pick_exploration.
local ERROR_FLOOR, WAITING_CAP = 0.1, 4

local function expected(c)
  local w = c.wait * 1000
  if w > c.est then return math.min(w, WAITING_CAP * c.est) end
  return c.est
end

local function loaded(c)
  return expected(c) * (1 + P.load_penalty * c.inf)
end

local function by_measured_score(a, b)
  local am, bm = a.est >= 0, b.est >= 0
  if am ~= bm then return am end
  if a.score ~= b.score then return a.score > b.score end
  return a.idx < b.idx
end

local function is_stale(c)
  return c.est < 0 or c.age > P.explore_after
end

local function staler(a, b)
  local am, bm = a.est >= 0, b.est >= 0
  if am ~= bm then return not am end
  if am and a.age ~= b.age then return a.age > b.age end
  return a.score > b.score
end

local function pick_exploration(cs)
  if #cs < 2 then return nil end
  local any_measured = false
  for _, c in ipairs(cs) do
    if c.est >= 0 then any_measured = true end
  end
  if not any_measured then return nil end
  local chosen = nil
  for _, c in ipairs(cs) do
    if c.st == CLOSED and not c.held and c.used < P.explore_max and is_stale(c) then
      if not chosen or staler(c, chosen) then chosen = c end
    end
  end
  return chosen
end

local function by_credit(a, b)
  if a.credit ~= b.credit then return a.credit > b.credit end
  return a.idx < b.idx
end

-- Per request (rank and the exploration pick read them): reset by `decide_one`.
local explored = nil
local may_explore = false

-- strategy.py `rank`: the admissible targets `cs` (configuration order) best first, scored
-- by `how`; with `explore_ok`, one stale target may be re-measured (sets `explored`).
local function rank(cs, how, explore_ok)
  local count = #cs
  local ordered = cs
  if count == 0 then return ordered end
  local chosen = nil
  if how == ROUND_ROBIN then
    ordered = {}
    local start = (rr - 1) % count
    for pos = 0, count - 1 do
      local c = cs[((start + pos) % count) + 1]
      c.score = 1 - pos / count
      ordered[pos + 1] = c
    end
  elseif how == WEIGHTED then
    local total = 0
    for _, c in ipairs(cs) do total = total + weights[c.idx] end
    for _, c in ipairs(cs) do c.score = c.credit / total end
    table.sort(cs, by_credit)
  else
    if how == COST then
      local most = cs[1].price
      for _, c in ipairs(cs) do if c.price > most then most = c.price end end
      for _, c in ipairs(cs) do
        if most > 0 then c.score = 1 - c.price / most else c.score = 1 end
      end
    elseif how == LATENCY then
      -- score = best / expected latency: the loaded estimate over the recent success rate.
      local best = -1
      for _, c in ipairs(cs) do
        if c.est >= 0 then
          local cost = loaded(c) / math.max(1 - c.err, ERROR_FLOOR)
          c.score = cost
          if best < 0 or cost < best then best = cost end
        end
      end
      for _, c in ipairs(cs) do
        if c.est < 0 then
          c.score = 0
        elseif c.score > 0 then
          c.score = best / c.score
        else
          c.score = 1
        end
      end
    elseif how == HYBRID then
      local most_price, most_latency = 0, 0
      for _, c in ipairs(cs) do
        if c.price > most_price then most_price = c.price end
        if c.est >= 0 then
          local l = loaded(c)
          if l > most_latency then most_latency = l end
        end
      end
      for _, c in ipairs(cs) do
        local cost_term = 1
        if most_price > 0 then cost_term = 1 - c.price / most_price end
        local reliability = 1 - c.err
        local latency_term
        if c.est < 0 then
          latency_term = 0
        elseif most_latency > 0 then
          latency_term = 1 - loaded(c) / most_latency
        else
          latency_term = 1
        end
        c.score = P.wc * cost_term + P.wl * latency_term + P.wr * reliability
      end
    else -- LEAST_BUSY
      local most = cs[1].inf
      for _, c in ipairs(cs) do if c.inf > most then most = c.inf end end
      for _, c in ipairs(cs) do
        if most > 0 then c.score = 1 - c.inf / most else c.score = 1 end
      end
    end
    if explore_ok then
      chosen = pick_exploration(cs)
      if chosen then chosen.explore = true end
    end
    if how == LATENCY or how == HYBRID then
      table.sort(cs, by_measured_score)
      -- The targets within `tolerance` of the best take turns by the shared cursor.
      local best = cs[1]
      local near = {}
      for _, c in ipairs(cs) do
        if (c.est >= 0) == (best.est >= 0) and c.score * (1 + P.tolerance) >= best.score then
          near[#near + 1] = c
        end
      end
      if #near > 1 then
        local pick = near[((rr - 1) % #near) + 1]
        ordered = {pick}
        for _, c in ipairs(cs) do
          if c ~= pick then ordered[#ordered + 1] = c end
        end
      end
    else
      table.sort(cs, by_score)
    end
  end
  if chosen then
    local rest = {chosen}
    for _, c in ipairs(ordered) do
      if c ~= chosen then rest[#rest + 1] = c end
    end
    ordered = rest
  end
  -- Half-open targets with a free probe slot go first: breakers recover only when probed.
  -- Held targets (failures in a row, their failure budget already in flight) go last.
  local probes, rest, held = {}, {}, {}
  for _, c in ipairs(ordered) do
    if c.probe then
      probes[#probes + 1] = c
    elseif c.held then
      held[#held + 1] = c
    else
      rest[#rest + 1] = c
    end
  end
  if #probes > 0 or #held > 0 then
    for _, c in ipairs(rest) do probes[#probes + 1] = c end
    for _, c in ipairs(held) do probes[#probes + 1] = c end
    ordered = probes
  end
  if chosen and ordered[1] ~= chosen then
    chosen.explore = false  -- a half-open probe went first: nothing is explored
    chosen = nil
  end
  if explore_ok then explored = chosen end
  return ordered
end

local function candidate_rows(reply, ordered, upto)
  for rank = 1, upto do
    local c = ordered[rank]
    reply[#reply + 1] = c.idx
    reply[#reply + 1] = c.st
    reply[#reply + 1] = string.format('%.17g', c.score)
    reply[#reply + 1] = c.s
    reply[#reply + 1] = c.lat
    reply[#reply + 1] = c.f
    reply[#reply + 1] = c.inf
    reply[#reply + 1] = c.held and 1 or 0
    reply[#reply + 1] = string.format('%.17g', c.est)
    reply[#reply + 1] = string.format('%.17g', c.err)
    reply[#reply + 1] = c.age
    reply[#reply + 1] = c.explore and 1 or 0
    reply[#reply + 1] = c.wait
    reply[#reply + 1] = c.credit
  end
end

-- Explain: one row per target, configuration order (wire.TARGET_ROW).
local function explain_rows(reply, totals, why, why_ms, live_count)
  for k = 1, n do
    local r = records[ids[k]]
    local b = records[bids[k]]
    local s, lat, f, tin, tout = totals(k)
    local e = estimates[ids[k]]
    local est, err, age = estimate(e, now)
    local stale_est = 0
    if est < 0 or age > P.explore_after then stale_est = 1 end
    local row = {b.st, b.gen, 0, 0, 0, b.to, math.max(0, r.cd - now), r.inf,
                 live_count[k] or 0, s, f, lat, tin, tout, why[k], why_ms[k],
                 string.format('%.17g', est), string.format('%.17g', err), age,
                 live_explores(e, nil, now), stale_est, waiting(e, r.inf, now),
                 current[ids[k]] or 0}
    if row[6] == 0 then row[6] = P.open_timeout end
    if b.st == CLOSED then row[3] = b.f end
    if b.st == HALF_OPEN then row[4] = b.ok end
    if b.st == OPEN then row[5] = math.max(0, b.u - now) end
    for _, v in ipairs(row) do reply[#reply + 1] = v end
  end
end

-- One request of the batch, its fields from ARGV[i] on: its reply, and where the next starts.
-- (Its constants are its own locals: Lua allows a function 60 upvalues.)
local function decide_one(i, first)
  local BREAKER_OPEN, RATE_LIMITED_OUT, PROBES_FULL = 1, 2, 3  -- wire.EXCLUSION_REASONS
  local LEARNED_LIMIT = 7
  local PIN_NEW, PIN_KEPT, PIN_MOVED = 1, 2, 3  -- wire.AFFINITY_STATES
  local mode = tonumber(ARGV[i])
  local token = ARGV[i + 1]
  local limit = tonumber(ARGV[i + 2])
  local tokens = tonumber(ARGV[i + 3])
  local session = ARGV[i + 4]
  i = i + 5
  local advance = mode ~= 0
  local excluded = {}
  local m = tonumber(ARGV[i])
  for k = 1, m do excluded[ARGV[i + k]] = true end
  i = i + m + 1
  local has_outcome = ARGV[i] == '1'
  if has_outcome and not explain then apply_argv(now, i + 1) end
  i = i + 1
  if has_outcome then i = i + OUTCOME_FIELDS end

  if first then
    -- Once per batch: within a run no lease expires that was not already expired, and
    -- every change after this keeps the in-flight counts and the lease set in step.
    expire_leases(now, explain)
    if explain then
      -- Explain reads the truth from the lease set itself (rare, and it changes nothing).
      local live = {}
      for _, member in ipairs(redis.call('ZRANGEBYSCORE', K_LEASES, '(' .. now, '+inf')) do
        local id = string.match(member, '^(.*)|[^|]*$')
        if id then live[id] = (live[id] or 0) + 1 end
      end
      for k = 1, n do records[ids[k]].inf = live[ids[k]] or 0 end
    else
      reconcile_inflight(ids)
    end
  end

  if advance and (kind == ROUND_ROBIN or windowed) then rr = rr + 1 end
  -- The windows, read once per batch (lib.lua `win` keeps them, samples included).
  if windowed or explain then window_prefetch(ids) end
  -- A writing decide rewrites a window holding stale buckets; explain passes no id.
  local function totals(k)
    if explain then return window_totals(win[ids[k]], now) end
    return window_totals(win[ids[k]], now, ids[k])
  end

  -- Quota counts of the targets that have quotas: read once per batch, in one call (none:
  -- no call at all), kept with what earlier requests of the batch added (lib.lua).
  local qvalues = {}
  if q > 0 then
    local qids = {}
    for pos, _ in pairs(quotas) do qids[#qids + 1] = ids[pos] end
    quota_prefetch(qids)
    for pos, _ in pairs(quotas) do qvalues[pos] = quota_value(ids[pos]) end
  end
  -- Admission: why each target is out (wire.EXCLUSION_REASONS), for how long.
  local quota_out = false
  local cands = {}
  local why, why_ms, live_count = {}, {}, {}
  local wait = 0
  for k = 1, n do
    local id = ids[k]
    local r = records[id]
    local b = records[bids[k]]  -- its breaker: r itself, or its provider's (lib.lua)
    half_open_if_due(b, bids[k], now)
    local reason, pause = 0, 0
    local live, earliest = 0, nil
    if b.st == HALF_OPEN then live, earliest = live_probes(b, bids[k], now) end
    live_count[k] = live
    if b.st == OPEN then
      reason, pause = BREAKER_OPEN, b.u - now
    elseif r.cd > now then
      reason, pause = RATE_LIMITED_OUT, r.cd - now
    elseif r.lu > now then
      reason, pause = LEARNED_LIMIT, r.lu - now
    elseif b.st == HALF_OPEN and live >= P.max_probes then
      reason, pause = PROBES_FULL, earliest - now
    elseif quotas[k] then
      reason, pause = quota_check(quotas[k], r.inf, qvalues[k], now, tokens)
    end
    why[k], why_ms[k] = reason, math.max(0, pause)
    if not excluded[id] then
      if reason ~= 0 then
        if wait == 0 or pause < wait then wait = pause end
        if reason >= QUOTA_CONCURRENCY then quota_out = true end
      else
        local c = {idx = k, id = id, price = prices[k], st = b.st, probe = b.st == HALF_OPEN,
                   s = 0, lat = 0, f = 0, inf = r.inf, score = 0, credit = 0,
                   held = b.st == CLOSED and b.f > 0 and b.f + r.inf >= P.failure_threshold,
                   est = -1, err = 0, age = -1, explore = false, used = 0, wait = 0}
        if windowed then
          c.s, c.lat, c.f = totals(k)
          c.est, c.err, c.age = estimate(estimates[id], now)
          c.wait = waiting(estimates[id], r.inf, now)
          if explain then
            c.used = live_explores(estimates[id], nil, now)
          else
            c.used = live_explores(estimates[id], id, now)
          end
        end
        if weighted then c.credit = (current[id] or 0) + weights[k] end
        cands[#cands + 1] = c
      end
    end
  end

  explored = nil
  may_explore = windowed and advance
    and (not last_explore or rr - last_explore >= P.explore_every)

  -- Sticky sessions (memory.py `_pin`): the session's pin, if live. Expired pins go first
  -- (at most 100 per call: the rest follow on later calls; a lookup checks the expiry).
  local pinned, present = nil, false
  local sticky = K_PINS and session ~= '' and not explain
  if sticky then
    local old = redis.call('ZRANGEBYSCORE', K_PINS, '-inf', now, 'LIMIT', 0, 100)
    if #old > 0 then
      local gone = {}
      for j, h in ipairs(old) do
        gone[j] = '@' .. h
        pins_set[h] = nil
      end
      redis.call('HDEL', K_TARGETS, unpack(gone))
      redis.call('ZREM', K_PINS, unpack(old))
    end
    local expiry = tonumber(redis.call('ZSCORE', K_PINS, session))
    present = expiry ~= nil
    if expiry and expiry > now then
      pinned = pins_set[session] or redis.call('HGET', K_TARGETS, '@' .. session)
    end
  end

  local ordered = cands
  local count = #cands
  if strategy == PRIORITY then
    -- strategy.py `_rank_groups`: each priority group ranked on its own by `within`, lower
    -- groups first; only the first group may explore (the request goes there).
    local levels, members = {}, {}
    for _, c in ipairs(cands) do
      local g = groups[c.idx]
      if not members[g] then
        members[g] = {}
        levels[#levels + 1] = g
      end
      members[g][#members[g] + 1] = c
    end
    table.sort(levels)
    ordered = {}
    for j, g in ipairs(levels) do
      for _, c in ipairs(rank(members[g], kind, may_explore and j == 1)) do
        ordered[#ordered + 1] = c
      end
    end
  else
    ordered = rank(cands, strategy, may_explore)
  end
  -- A pinned target that is admissible (and not already tried by this request) goes first,
  -- whatever the strategy says; otherwise the pin moves to whatever is admitted.
  local pin_state, pin_from = 0, 0
  if sticky and count > 0 then
    pin_state = PIN_NEW
    if pinned then
      pin_state = PIN_MOVED
      for j, c in ipairs(ordered) do
        if c.id == pinned then
          pin_state = PIN_KEPT
          if j > 1 then
            table.remove(ordered, j)
            table.insert(ordered, 1, c)
          end
          break
        end
      end
      if pin_state == PIN_MOVED then
        for k = 1, n do if ids[k] == pinned then pin_from = k end end
      end
    end
    if explored and ordered[1] ~= explored then
      explored.explore = false  -- the pin went first: nothing is explored
      explored = nil
    end
  end

  local repaired = 0
  if first then repaired = REPAIRED end
  local reply = {0, 0, 0, wait, rr, count, count, now, repaired, 0, 0, pin_state, pin_from, 0}
  if explain and K_PINS then
    local live = redis.call('ZCOUNT', K_PINS, '(' .. now, '+inf')
    if redis.call('ZSCORE', K_PINS, '#') then live = live - 1 end
    reply[14] = live
  end
  if count == 0 and quota_out then reply[11] = 1 end
  if explain then
    candidate_rows(reply, ordered, count)
    explain_rows(reply, totals, why, why_ms, live_count)
    return reply, i
  end
  if count > 0 then
    local first_c = ordered[1]
    local r = records[first_c.id]
    local b = records[bids[first_c.idx]]
    if first_c.probe then
      b.probes[token] = now + P.probe_ttl
      touch(bids[first_c.idx])
    end
    if windowed and r.inf == 0 then
      estimates[first_c.id].w = now  -- busy from now: nothing outstanding before
      touch_est(first_c.id)
    end
    if first_c.explore then
      estimates[first_c.id].x[token] = now + P.explore_ttl
      touch_est(first_c.id)
      last_explore = rr
      explore_moved = true
    end
    r.inf = r.inf + 1
    touch(first_c.id)
    redis.call('ZADD', K_LEASES, now + P.lease_ttl, first_c.id .. '|' .. token)
    local fq = quotas[first_c.idx]
    if fq then
      local reserve = quota_reserve(fq, tokens)
      quota_add(first_c.id, qvalues[first_c.idx], now, 1, reserve, now)
      reply[10] = reserve
    end
    if weighted and advance then
      -- memory.py `_swrr_step`: the admissible earn their weight, the admitted pays the total.
      local total = 0
      for _, c in ipairs(cands) do
        current[c.id] = c.credit
        total = total + weights[c.idx]
      end
      current[first_c.id] = current[first_c.id] - total
      current_moved = true
    end
    if sticky then
      -- The pin (new, kept or moved) lives `affinity_ttl` from this use. A new one first
      -- makes room: past `max_pins` the least recently used go (lowest expiry, then member;
      -- the placeholder '#' scores +inf, never among them).
      if not present then
        local held = redis.call('ZCARD', K_PINS)
        if redis.call('ZSCORE', K_PINS, '#') then held = held - 1 end
        local over = held + 1 - P.max_pins
        if over > 0 then
          local popped = redis.call('ZPOPMIN', K_PINS, over)
          local gone = {}
          for j = 1, #popped, 2 do
            gone[#gone + 1] = '@' .. popped[j]
            pins_set[popped[j]] = nil
          end
          redis.call('HDEL', K_TARGETS, unpack(gone))
        end
      end
      redis.call('ZADD', K_PINS, now + P.affinity_ttl, session)
      pins_set[session] = first_c.id
    end
    reply[1] = 1
    reply[2] = b.gen
    if first_c.probe then reply[3] = 1 end
    reply[4] = 0
    -- The reply carries the first `limit` candidates (0: all); the count says how many.
    if limit > 0 and limit < count then reply[6] = limit end
    candidate_rows(reply, ordered, reply[6])
  end
  return reply, i
end

local replies = {}
for j = 1, batch do replies[j], i = decide_one(i, j == 1) end
if explain then return replies end

-- The route-level values the batch moved, written back with the records in one HSET.
local extra = {}
if rr ~= rr_loaded then
  extra[#extra + 1] = '#rr'
  extra[#extra + 1] = rr
end
if explore_moved then
  extra[#extra + 1] = '#x'
  extra[#extra + 1] = last_explore
end
if current_moved then
  local parts = {}
  for k = 1, n do
    local w = current[ids[k]]
    if w and w ~= 0 then parts[#parts + 1] = string.format('%d|%s', w, ids[k]) end
  end
  extra[#extra + 1] = '#sw'
  extra[#extra + 1] = table.concat(parts, ' ')
end
for h, id in pairs(pins_set) do
  extra[#extra + 1] = '@' .. h
  extra[#extra + 1] = id
end
flush(extra)
return replies
