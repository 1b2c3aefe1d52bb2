-- heartbeat: a replica says it is alive; the reply is how many replicas are (Redis time).
-- KEYS[1] = zset {prefix:replicas}, member replica id, score = last heartbeat (ms).
-- The count divides limits between replicas while Redis is away (on_state_loss: local_share).
-- ARGV: replica_id ttl_ms key_ttl_ms clock_ms
-- REPLY: live

local K_REPLICAS = KEYS[1]
local P = {key_ttl = tonumber(ARGV[3])}
local now = tonumber(ARGV[#ARGV])
if not now or now <= 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local found = redis.call('TYPE', K_REPLICAS).ok
if found ~= 'none' and found ~= 'zset' then redis.call('DEL', K_REPLICAS) end
redis.call('ZADD', K_REPLICAS, now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', K_REPLICAS, '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', K_REPLICAS, P.key_ttl)
return {redis.call('ZCARD', K_REPLICAS)}
