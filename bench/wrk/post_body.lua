-- wrk: each connection POSTs one fixed body to its own path, read from the files named in
-- the environment: WRK_PATHS (one path per line, connection i takes line i mod n) and WRK_BODY.
local paths, body = {}, nil
local counter = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end

function init(args)
  for line in io.lines(os.getenv("WRK_PATHS")) do paths[#paths + 1] = line end
  local f = io.open(os.getenv("WRK_BODY"), "rb")
  body = f:read("*a")
  f:close()
  wrk.method = "POST"
  wrk.body = body
  wrk.headers["Content-Type"] = "application/json"
  next_path = id
end

function request()
  next_path = next_path + 1
  return wrk.format(nil, paths[(next_path % #paths) + 1])
end

function done(summary, latency, requests)
  io.write(string.format("WRKRESULT %d %d %.3f %.3f\n", summary.requests,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout, latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
