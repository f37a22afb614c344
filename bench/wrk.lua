-- wrk script for the benchmarks: POSTs pre-signed Twilio webhook bodies, each MessageSid once.
-- Usage: [WRK_STAGGER_MS=S WRK_CONNECTIONS=C] wrk -s bench/wrk.lua URL -- BODIES_FILE THREADS
--   BODIES_FILE has one "signature<TAB>body" line per message; thread k takes lines k, k+THREADS, ...
--   WRK_STAGGER_MS > 0 delays each connection's first request by a random 0..S ms, so C connections behave like
--   C users whose messages arrive at independent times instead of in one synchronized burst. Without it the
--   script defines no delay(), which would otherwise cost wrk a timer event per request.
-- done() prints one line "BENCH_JSON {...}" with counts and latency percentiles (microseconds).

local threads = {}
local next_id = 0

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

local sigs, bodies = {}, {}
local count, index, wrapped = 0, 0, 0
local stagger_ms = tonumber(os.getenv("WRK_STAGGER_MS") or "0")
local staggered, first_requests = 0, 0
local headers = {["Content-Type"] = "application/x-www-form-urlencoded"}

function init(args)
  local file, nthreads = args[1], tonumber(args[2])
  -- Each thread opens its share of the connections: that many first requests get a stagger.
  first_requests = math.ceil(tonumber(os.getenv("WRK_CONNECTIONS") or "0") / nthreads)
  local line_no = 0
  for line in io.lines(file) do
    if line_no % nthreads == id then
      local sig, body = line:match("^([^\t]*)\t(.*)$")
      count = count + 1
      sigs[count], bodies[count] = sig, body
    end
    line_no = line_no + 1
  end
  math.randomseed(1000 + id)
end

if stagger_ms > 0 then
  function delay()
    if staggered < first_requests then
      staggered = staggered + 1
      return math.random(0, stagger_ms)
    end
    return 0
  end
end

function request()
  index = index + 1
  if index > count then
    -- Out of unique bodies: repeats are answered as duplicates, so the runner sizes the file to avoid this.
    index, wrapped = 1, wrapped + 1
  end
  headers["X-Twilio-Signature"] = sigs[index]
  return wrk.format("POST", wrk.path, headers, bodies[index])
end

function done(summary, latency, requests)
  local wraps = 0
  for _, thread in ipairs(threads) do
    wraps = wraps + (thread:get("wrapped") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "errors": {"connect": %d, "read": %d, ' ..
    '"write": %d, "status": %d, "timeout": %d}, "wrapped": %d, "latency_us": {"min": %d, "mean": %.1f, ' ..
    '"p50": %d, "p90": %d, "p99": %d, "p999": %d, "max": %d}}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout, wraps,
    latency.min, latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max))
end
