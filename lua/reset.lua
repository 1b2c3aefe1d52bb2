-- reset: close one target's breaker (with breaker_scope provider: its provider's, for every
-- route sharing it) and lift its cooldown and learned limit (an operator's decision; its
-- quota counts stand: they are what the provider has seen).
-- ARGV: target_id provider clock_ms
-- REPLY: generation repaired

local id = ARGV[ARG0 + 1]
local bid = breaker_id(id, ARGV[ARG0 + 2])
local r = load(id)
local b = load(bid)
b.st = CLOSED
b.gen = b.gen + 1
b.f = 0
b.ok = 0
b.u = 0
b.to = 0
b.probes = {}
r.cd = 0
r.lu = 0
touch(id)
touch(bid)
flush(nil)
return {b.gen, REPAIRED}
