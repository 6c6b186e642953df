-- wrk script: replay pre-signed deliveries from a request file (see payloads.py).
--   wrk ... -s bench/replay.lua URL -- FILE HEADER
-- Each wrk thread takes every n-th line of FILE (its own slice, so flow ids stay unique across
-- threads) and sends them in order, wrapping around when they run out; `wraps` reports that,
-- because a wrapped file re-sends known flow ids. Answers are counted by status and by the
-- appliance's verdict ("accepted" / "duplicate") so the runner can check what path was measured.
-- done() prints one line, "BENCHJSON {...}", that bench/load.py parses.

local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

local reqs = {}
local n, idx = 0, 0
wraps = 0
accepted, duplicate = 0, 0
statuses = {}

function init(args)
  local path, header = args[1], args[2]
  local nthreads = #threads
  if nthreads == 0 then nthreads = 1 end
  local f = assert(io.open(path, "rb"))
  local i = 0
  for line in f:lines() do
    if i % nthreads == (tid or 0) then
      local tab = line:find("\t", 1, true)
      local headers = {}
      headers["Content-Type"] = "application/json"
      headers[header] = line:sub(1, tab - 1)
      reqs[#reqs + 1] = wrk.format("POST", nil, headers, line:sub(tab + 1))
    end
    i = i + 1
  end
  f:close()
  n = #reqs
  assert(n > 0, "empty request file " .. path)
end

function request()
  idx = idx + 1
  if idx > n then
    idx = 1
    wraps = wraps + 1
  end
  return reqs[idx]
end

function response(status, headers, body)
  local key = tostring(status)
  statuses[key] = (statuses[key] or 0) + 1
  if body then
    if body:find('"accepted"', 1, true) then
      accepted = accepted + 1
    elseif body:find('"duplicate"', 1, true) then
      duplicate = duplicate + 1
    end
  end
end

function done(summary, latency, requests)
  local acc, dup, wr = 0, 0, 0
  local merged = {}
  for _, t in ipairs(threads) do
    acc = acc + (t:get("accepted") or 0)
    dup = dup + (t:get("duplicate") or 0)
    wr = wr + (t:get("wraps") or 0)
    for k, v in pairs(t:get("statuses") or {}) do
      merged[k] = (merged[k] or 0) + v
    end
  end
  local parts = {}
  for k, v in pairs(merged) do
    parts[#parts + 1] = string.format('"%s":%d', k, v)
  end
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"p50_us":%d,"p99_us":%d,"accepted":%d,"duplicate":%d,"wraps":%d,"statuses":{%s}}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), acc, dup, wr, table.concat(parts, ",")))
end
