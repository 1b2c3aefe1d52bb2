-- record: apply a batch of finished attempts of one route, in order, atomically.
-- ARGV: k *[outcome] clock_ms
-- REPLY: applied repaired
--   k outcomes of OUTCOME_FIELDS fields each, applied in order.

local now = now_ms()
local k = tonumber(ARGV[ARG0 + 1])
local i = ARG0 + 2
for _ = 1, k do
  apply_argv(now, i)
  i = i + OUTCOME_FIELDS
end
flush(nil)
return {k, REPAIRED}
