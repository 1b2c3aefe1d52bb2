-- reset: close one target's breaker and lift its cooldown and learned limit (an operator's
-- decision; its quota counts stand: they are what the provider has seen).
-- ARGV: target_id clock_ms
-- REPLY: generation repaired

local id = ARGV[ARG0 + 1]
local r = load(id)
r.st = CLOSED
r.gen = r.gen + 1
r.f = 0
r.ok = 0
r.u = 0
r.to = 0
r.cd = 0
r.lu = 0
r.probes = {}
touch(id)
flush(nil)
return {r.gen, REPAIRED}
