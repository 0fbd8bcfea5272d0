-- wrk script for bench_predict.py: every request scores freshly drawn entities.
--
--   wrk -s loadtests/wrk_post.lua URL -- <n_ids> <batch> <mode> <seed> <token>
--
-- n_ids  ids are drawn uniformly from E0000000 .. E(n_ids-1)
-- batch  0: a /v1/predict body (one item); k > 0: a /v1/predict/batch body of k items;
--        -1: a GET with no body (bench_floor.py: a route that does no scoring)
-- mode   "uniform": random context per item, so (entity, context) never repeats and the
--        prediction cache cannot hit; "hot": the context is a function of the id, so a
--        repeated id is repeated work and caches can hit
-- seed   run seed; each thread seeds with (seed, thread number), so threads and runs
--        never replay the same id sequence
-- token  API key, or "-" for none
--
-- done() prints one line "BENCH_JSON {...}" with the counters bench_predict.py reads.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
   thread:set("thread_no", #threads)
end

local channels = { "web", "app", "store" }
local n_ids, batch, hot

function init(args)
   n_ids = tonumber(args[1])
   batch = tonumber(args[2])
   hot = args[3] == "hot"
   math.randomseed(tonumber(args[4]) * 1000 + thread_no)
   for _ = 1, 10 do math.random() end
   if batch < 0 then
      wrk.method = "GET"
   else
      wrk.method = "POST"
      wrk.headers["Content-Type"] = "application/json"
   end
   if args[5] ~= nil and args[5] ~= "-" then
      wrk.headers["Authorization"] = "Bearer " .. args[5]
   end
   scored, cached, degraded, failed = 0, 0, 0, 0
   codes = {}
   sample = ""
end

local function item()
   local i = math.random(0, n_ids - 1)
   local amount, hour, channel
   if hot then
      amount, hour, channel = (i % 500) + 0.5, i % 24, channels[i % 3 + 1]
   else
      amount = math.random(100, 99999) / 100
      hour, channel = math.random(0, 23), channels[math.random(1, 3)]
   end
   return string.format(
      '{"entity_id":"E%07d","context":{"amount":%.2f,"hour":%d,"channel":"%s"}}',
      i, amount, hour, channel)
end

function request()
   local body
   if batch < 0 then
      return wrk.format(nil, nil, nil, nil)
   elseif batch == 0 then
      body = item()
   else
      local items = {}
      for k = 1, batch do items[k] = item() end
      body = '{"items":[' .. table.concat(items, ",") .. "]}"
   end
   return wrk.format(nil, nil, nil, body)
end

local function count(body, needle)
   local _, n = string.gsub(body, needle, "")
   return n
end

function response(status, headers, body)
   codes[status] = (codes[status] or 0) + 1
   if status >= 200 and status < 300 then
      scored = scored + count(body, '"score":')
      cached = cached + count(body, '"cached":true')
      degraded = degraded + count(body, '"degraded":true')
      failed = failed + count(body, '"ok":false')
   elseif sample == "" then
      sample = status .. " " .. string.gsub(string.sub(body, 1, 300), '[%c"\\]', " ")
   end
end

function done(summary, latency, requests)
   local totals = { scored = 0, cached = 0, degraded = 0, failed = 0 }
   local all_codes = {}
   local samples = {}
   for _, thread in ipairs(threads) do
      for key, _ in pairs(totals) do
         totals[key] = totals[key] + thread:get(key)
      end
      for code, n in pairs(thread:get("codes")) do
         all_codes[code] = (all_codes[code] or 0) + n
      end
      local s = thread:get("sample")
      if s ~= "" then table.insert(samples, s) end
   end
   local parts = {}
   for code, n in pairs(all_codes) do
      table.insert(parts, string.format('"%d":%d', code, n))
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"mean":%.1f,"max":%d},' ..
      '"scored":%d,"cached":%d,"degraded":%d,"failed_items":%d,"codes":{%s},"sample":"%s"}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.mean, latency.max,
      totals.scored, totals.cached, totals.degraded, totals.failed,
      table.concat(parts, ","), table.concat(samples, " | ")))
end
