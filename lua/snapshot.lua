-- snapshot: what the state says about each target, changing nothing (admin, explain, tests).
-- ARGV after the route parameters: n, then n target ids.
-- Reply: rr_cursor now_ms, then per target: state generation consecutive_failures
--        half_open_successes open_remaining_ms open_timeout_ms cooldown_remaining_ms inflight
--        probes_in_use successes failures latency_us tokens_in tokens_out

local now = now_ms()
local n = tonumber(ARGV[ARG0 + 1])
local ids = {}
for k = 1, n do ids[k] = ARGV[ARG0 + 1 + k] end
local reply = {tonumber(redis.call('HGET', K_TARGETS, '#rr')) or 0, now}
if n == 0 then return reply end
local values = redis.call('HMGET', K_TARGETS, unpack(ids))
local windows = redis.call('HMGET', K_WINDOW, unpack(ids))
-- Leases past their expiry no longer count, even before a decide sweeps them.
local stale = {}
for _, member in ipairs(redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now)) do
  local id = string.match(member, '^(.*)|[^|]*$')
  if id then stale[id] = (stale[id] or 0) + 1 end
end
for k = 1, n do
  local r = parse(values[k])
  local st, gen = r.st, r.gen
  if st == OPEN and now >= r.u then st, gen = HALF_OPEN, gen + 1 end
  local probes = 0
  if st == HALF_OPEN and r.st == HALF_OPEN then
    for _, expiry in pairs(r.probes) do
      if expiry > now then probes = probes + 1 end
    end
  end
  local failures, ok, open_remaining = 0, 0, 0
  if st == CLOSED then failures = r.f end
  if st == HALF_OPEN then ok = r.ok end
  if st == OPEN then open_remaining = math.max(0, r.u - now) end
  local timeout = r.to
  if timeout == 0 then timeout = P.open_timeout end
  local s, lat, f, tin, tout = window_totals(windows[k], now)
  local row = {st, gen, failures, ok, open_remaining, timeout, math.max(0, r.cd - now),
               r.inf - (stale[ids[k]] or 0), probes, s, f, lat, tin, tout}
  for _, v in ipairs(row) do reply[#reply + 1] = v end
end
return reply
