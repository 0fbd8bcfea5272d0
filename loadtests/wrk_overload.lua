-- wrk script for bench_overload.py: an offered request RATE (open loop), not a
-- concurrency, with latencies kept apart for successes and refusals.
--
--   wrk -t T -c C -d D -s loadtests/wrk_overload.lua URL -- <rate> <n_ids> <seed> <token>
--
-- rate   requests per second offered by all threads together (0: closed loop, as fast
--        as the C connections go)
-- n_ids  entity ids are drawn uniformly from E0000000 .. E(n_ids-1), with a random
--        context per request, so the prediction cache cannot hit
--
-- Each thread sends on a fixed schedule of rate / T per second: delay() holds a
-- connection until its next slot. A closed-loop load generator slows down exactly when
-- the server does and so never offers more than it can take; with enough connections
-- (C >> rate x latency) this one keeps offering the rate while the server is saturated.
-- Slots that found no free connection are counted as "missed" (offered load that was not
-- sent): bench_overload.py reports the rate really offered.
--
-- wrk does not tell the script which request a response answers, so the send time rides
-- in X-Request-ID (the service echoes a sane id) and the latency is measured from it:
-- from the moment request() builds the request, right before it is written.
--
-- done() prints one line "OVERLOAD_JSON {...}": counts per status, and per class (ok,
-- refused = 503/429, other) the latencies in ms, sorted, plus per second since the start
-- the successes' count and p99 and the count of answers that were not successes.

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } ovl_timespec;
int clock_gettime(int clk, ovl_timespec *tp);
]]
local ts = ffi.new("ovl_timespec")
local function now_us()
   ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
   return tonumber(ts.tv_sec) * 1000000 + math.floor(tonumber(ts.tv_nsec) / 1000)
end

local threads = {}

function setup(thread)
   table.insert(threads, thread)
   thread:set("thread_no", #threads)
end

local channels = { "web", "app", "store" }
local n_ids, interval_us, next_at, started_us

function init(args)
   local rate = tonumber(args[1])
   n_ids = tonumber(args[2])
   math.randomseed(tonumber(args[3]) * 1000 + thread_no)
   for _ = 1, 10 do math.random() end
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
   if args[4] ~= nil and args[4] ~= "-" then
      wrk.headers["Authorization"] = "Bearer " .. args[4]
   end
   local n_threads = tonumber(args[5]) or 1
   interval_us = rate > 0 and (1000000 * n_threads / rate) or 0
   started_us = now_us()
   -- threads start a fraction of an interval apart so their slots interleave
   next_at = started_us + interval_us * (thread_no - 1) / n_threads
   codes, ok_ms, refused_ms, other_ms, no_id = {}, {}, {}, {}, 0
   missed, sent, retry_after = 0, 0, {}
   ok_second = {} -- parallel to ok_ms: the second (since start) each success came back
   fail_second = {} -- the second each answer that was not a success came back
end

function delay()
   if interval_us == 0 then return 0 end
   local now = now_us()
   if next_at < now - interval_us then
      -- the schedule fell behind: every connection was busy. Count the lost slots.
      local lost = math.floor((now - next_at) / interval_us)
      missed = missed + lost
      next_at = next_at + lost * interval_us
   end
   local slot = next_at
   next_at = next_at + interval_us
   if slot <= now then return 0 end
   return math.floor((slot - now) / 1000)
end

function request()
   sent = sent + 1
   local i = math.random(0, n_ids - 1)
   local body = string.format(
      '{"entity_id":"E%07d","context":{"amount":%.2f,"hour":%d,"channel":"%s"}}',
      i, math.random(100, 99999) / 100, math.random(0, 23), channels[math.random(1, 3)])
   -- wrk.format's headers argument replaces wrk.headers (the key): set the id in place
   wrk.headers["X-Request-ID"] = "t" .. now_us()
   return wrk.format(nil, nil, nil, body)
end

function response(status, headers, body)
   codes[status] = (codes[status] or 0) + 1
   local now = now_us()
   local second = math.floor((now - started_us) / 1000000)
   local id = headers["x-request-id"] or headers["X-Request-ID"] or headers["X-Request-Id"]
   if id == nil or string.sub(id, 1, 1) ~= "t" then
      no_id = no_id + 1
      table.insert(fail_second, second)
      return
   end
   local ms = (now - tonumber(string.sub(id, 2))) / 1000
   if status >= 200 and status < 300 then
      table.insert(ok_ms, ms)
      table.insert(ok_second, second)
      return
   end
   table.insert(fail_second, second)
   if status == 503 or status == 429 then
      table.insert(refused_ms, ms)
      local ra = headers["retry-after"] or headers["Retry-After"] or "none"
      retry_after[ra] = (retry_after[ra] or 0) + 1
   else
      table.insert(other_ms, ms)
   end
end

local function merged(key)
   local all = {}
   for _, thread in ipairs(threads) do
      for _, v in ipairs(thread:get(key)) do table.insert(all, v) end
   end
   table.sort(all)
   return all
end

local function quantile(sorted, q)
   if #sorted == 0 then return -1 end
   return sorted[math.max(1, math.ceil(q * #sorted))]
end

local function summary_of(sorted)
   return string.format('{"n":%d,"p50":%.2f,"p90":%.2f,"p99":%.2f,"max":%.2f}',
      #sorted, quantile(sorted, 0.5), quantile(sorted, 0.9), quantile(sorted, 0.99),
      quantile(sorted, 1.0))
end

local function count_map(key)
   local all = {}
   for _, thread in ipairs(threads) do
      for k, n in pairs(thread:get(key)) do all[k] = (all[k] or 0) + n end
   end
   local parts = {}
   for k, n in pairs(all) do table.insert(parts, string.format('"%s":%d', tostring(k), n)) end
   return "{" .. table.concat(parts, ",") .. "}"
end

function done(summary, latency, requests)
   -- thread:get copies flat tables only (nested ones crash wrk 4.1): parallel arrays
   local seconds = {}
   for _, thread in ipairs(threads) do
      local values, when = thread:get("ok_ms"), thread:get("ok_second")
      for k, v in ipairs(values) do
         local s = when[k]
         seconds[s] = seconds[s] or {}
         table.insert(seconds[s], v)
      end
   end
   local series = {}
   for s, values in pairs(seconds) do
      table.sort(values)
      table.insert(series, string.format('"%d":[%d,%.2f]', s, #values, quantile(values, 0.99)))
   end
   local failed = {}
   for _, thread in ipairs(threads) do
      for _, s in ipairs(thread:get("fail_second")) do failed[s] = (failed[s] or 0) + 1 end
   end
   local failed_series = {}
   for s, n in pairs(failed) do table.insert(failed_series, string.format('"%d":%d', s, n)) end
   local totals = { sent = 0, missed = 0, no_id = 0 }
   for _, thread in ipairs(threads) do
      for key, _ in pairs(totals) do totals[key] = totals[key] + thread:get(key) end
   end
   local e = summary.errors
   io.write(string.format(
      'OVERLOAD_JSON {"requests":%d,"duration_us":%d,"sent":%d,"missed":%d,"no_id":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"codes":%s,"retry_after":%s,"ok":%s,"refused":%s,"other":%s,"ok_p99_by_second":{%s},' ..
      '"failed_by_second":{%s}}\n',
      summary.requests, summary.duration, totals.sent, totals.missed, totals.no_id,
      e.connect, e.read, e.write, e.status, e.timeout,
      count_map("codes"), count_map("retry_after"),
      summary_of(merged("ok_ms")), summary_of(merged("refused_ms")),
      summary_of(merged("other_ms")), table.concat(series, ","),
      table.concat(failed_series, ",")))
end
