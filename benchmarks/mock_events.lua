-- mock_server.py: POST /api/events with a fresh id each time (the server dedupes by
-- Idempotency-Key, so every request is a new event); TOKEN from the environment.
local counter = 0
local prefix = ""
local token = os.getenv("TOKEN") or ""
local pad = string.rep("x", 400)

function init(args)
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
  prefix = string.format("%08x-", math.random(0, 0x7fffffff))
end

function request()
  counter = counter + 1
  local id = prefix .. counter
  local body = '{"id":"' .. id .. '","source":"github","type":"push",'
    .. '"received_at":"2026-11-30T00:00:00.000000Z","headers":{"x-github-event":"push"},'
    .. '"payload":{"action":"opened","n":' .. counter .. ',"pad":"' .. pad .. '"}}'
  return wrk.format("POST", "/api/events", {
    ["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. token,
    ["Idempotency-Key"] = id}, body)
end

local non202 = 0
function response(status, headers, body)
  if status ~= 202 then non202 = non202 + 1 end
end

function done(summary, latency, requests)
  io.write(string.format("RESULT requests=%d non2xx_or_3xx=%d\n", summary.requests,
    summary.errors.status))
end
