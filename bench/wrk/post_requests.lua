-- wrk: POST requests of their own path, body and headers, listed in the file WRK_REQUESTS: one
-- line per request, "PATH<TAB>BODY_FILE<TAB>INFERENCE_HEADER_LENGTH" (the last may be empty).
-- Of n threads, thread t sends the requests t, t + n, t + 2n, ... in turn, so with one request
-- per sequence and as many connections as sequences, the threads never share a sequence.
local counter = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end

local requests = {}
local turn = 0

function init(args)
  local nthreads = tonumber(os.getenv("WRK_THREADS"))
  local i = 0
  for line in io.lines(os.getenv("WRK_REQUESTS")) do
    if i % nthreads == id then
      local path, file, header = line:match("^([^\t]*)\t([^\t]*)\t?(.*)$")
      local f = io.open(file, "rb")
      local body = f:read("*a")
      f:close()
      local headers = { ["Content-Type"] = "application/json" }
      if header ~= nil and header ~= "" then
        headers["Inference-Header-Content-Length"] = header
        headers["Content-Type"] = "application/octet-stream"
      end
      requests[#requests + 1] = wrk.format("POST", path, headers, body)
    end
    i = i + 1
  end
end

function request()
  turn = turn % #requests + 1
  return requests[turn]
end

function done(summary, latency, requests)
  io.write(string.format("WRKRESULT %d %d %.3f %.3f\n", summary.requests,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout, latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
