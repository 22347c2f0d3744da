#!lua
-- One batch of writes within one partition (one hash slot): the atomic
-- unit of the Redis domains (cluster/redis_domains.rs). KEYS[1] is the
-- partition's owner key and ARGV[1] the writer's token: a writer that no
-- longer owns the partition is refused before anything is written
-- (fencing). Then KEYS are the keys the ops touch, in op order, and ARGV
-- each op's code and arguments. Every op is built by the Rust side, so
-- none fails halfway (the shebang makes Redis refuse the whole script up
-- front when it is out of memory), and every op is idempotent, so a batch
-- retried after a lost reply leaves the same state.
--
-- Queue members are a 16-hex-digit timestamp followed by the entry's bytes,
-- scored by seq. Each partition has a queue-head index (member
-- "user:device", score the timestamp of the device's oldest entry), kept
-- exact here. A queue's entry count is its ZCARD; its bytes (field b<D> of
-- the user's usage hash) and the partition's entry count change by the sum
-- of the script's ops, written once at the end: every Redis call costs
-- ~2.5 us here, most of a script's cost, and a batch often puts many
-- entries into one queue (a group message's receipts into its sender's).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED this node does not own the partition')
end
local ki, ai = 1, 1
local function key() ki = ki + 1; return KEYS[ki] end
local function arg() ai = ai + 1; return ARGV[ai] end

local heads, touched = {}, {}
local function touch(q, ix, m)
  if not heads[q] then heads[q] = { ix, m }; touched[#touched + 1] = q end
end

-- Deltas to write at the end: bytes per usage hash and field, entries per
-- partition counter (each in first-seen order, so replicas and the AOF see
-- the same commands in the same order every time).
local bytes, byte_keys, counts, count_keys = {}, {}, {}, {}
local function bytes_key(use, field) return use .. '\0' .. field end
local function add_bytes(use, field, n)
  local k = bytes_key(use, field)
  if not bytes[k] then bytes[k] = { use, field, 0 }; byte_keys[#byte_keys + 1] = k end
  bytes[k][3] = bytes[k][3] + n
end
local function add_count(qn, n)
  if not counts[qn] then counts[qn] = 0; count_keys[#count_keys + 1] = qn end
  counts[qn] = counts[qn] + n
end

-- Removes the entries of seq `seq` (at most one) and returns how many.
local function remove(q, use, dev, seq)
  local old = redis.call('ZRANGEBYSCORE', q, seq, seq)
  for _, o in ipairs(old) do
    redis.call('ZREM', q, o)
    add_bytes(use, 'b' .. dev, 16 - #o)
  end
  return #old
end

while ai < #ARGV do
  local op = arg()
  if op == 'enq' then
    local q, use, ix, qn = key(), key(), key(), key()
    local dev, m, seq, member = arg(), arg(), arg(), arg()
    local removed = remove(q, use, dev, seq)
    redis.call('ZADD', q, seq, member)
    add_bytes(use, 'b' .. dev, #member - 16)
    add_count(qn, 1 - removed)
    touch(q, ix, m)
  elseif op == 'deq' then
    local q, use, ix, qn = key(), key(), key(), key()
    local dev, m, seq = arg(), arg(), arg()
    add_count(qn, 0 - remove(q, use, dev, seq))
    touch(q, ix, m)
  elseif op == 'drop' then
    local q, n, use, ix, qn = key(), key(), key(), key(), key()
    local dev, m = arg(), arg()
    add_count(qn, 0 - redis.call('ZCARD', q))
    redis.call('DEL', q, n)
    -- e<D> is the entry count of earlier versions, which kept one.
    redis.call('HDEL', use, 'e' .. dev, 'b' .. dev)
    local k = bytes_key(use, 'b' .. dev)
    if bytes[k] then bytes[k][3] = 0 end
    touch(q, ix, m)
  elseif op == 'res' then
    local n = key()
    local upto = arg()
    local cur = redis.call('GET', n)
    if not cur or tonumber(cur) < tonumber(upto) then redis.call('SET', n, upto) end
  elseif op == 'dput' then
    local d, dix = key(), key()
    local rec, at = arg(), arg()
    redis.call('SET', d, rec)
    redis.call('ZADD', dix, at, d)
  elseif op == 'dexp' then
    local d, dix = key(), key()
    local before = tonumber(arg())
    local at = redis.call('ZSCORE', dix, d)
    if at and tonumber(at) < before then
      redis.call('DEL', d)
      redis.call('ZREM', dix, d)
    end
  elseif op == 'mput' then
    local mk, mix = key(), key()
    local id, rec, owner = arg(), arg(), arg()
    redis.call('HSET', mk, id, rec)
    redis.call('SADD', mix, owner)
  elseif op == 'mdel' then
    local mk, mix = key(), key()
    local id, owner = arg(), arg()
    redis.call('HDEL', mk, id)
    if redis.call('HLEN', mk) == 0 then redis.call('SREM', mix, owner) end
  elseif op == 'pput' then
    local p, pix = key(), key()
    local rec, at, m = arg(), arg(), arg()
    redis.call('SET', p, rec)
    redis.call('ZADD', pix, at, m)
  elseif op == 'pdel' then
    local p, pix = key(), key()
    local m = arg()
    redis.call('DEL', p)
    redis.call('ZREM', pix, m)
  else
    return redis.error_reply('unknown op ' .. tostring(op))
  end
end

for _, k in ipairs(byte_keys) do
  local b = bytes[k]
  if b[3] ~= 0 then redis.call('HINCRBY', b[1], b[2], b[3]) end
end
for _, qn in ipairs(count_keys) do
  if counts[qn] ~= 0 then redis.call('INCRBY', qn, counts[qn]) end
end

for _, q in ipairs(touched) do
  local ix, m = heads[q][1], heads[q][2]
  local head = redis.call('ZRANGE', q, 0, 0)
  if #head == 0 then
    redis.call('ZREM', ix, m)
  else
    redis.call('ZADD', ix, tonumber(string.sub(head[1], 1, 16), 16), m)
  end
end
return 1
