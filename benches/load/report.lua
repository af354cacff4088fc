-- wrk script: at the end, one JSON line with what the benchmark table needs.
-- Latencies from wrk are in microseconds; errors.status counts responses that were not 2xx/3xx.
done = function(summary, latency, requests)
  local e = summary.errors
  local secs = summary.duration / 1e6
  io.write(string.format(
    '{"requests": %d, "secs": %.3f, "rps": %.1f, "bytes": %d, "mbps": %.2f, ' ..
    '"p50_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f, ' ..
    '"err_connect": %d, "err_read": %d, "err_write": %d, "err_status": %d, "err_timeout": %d}\n',
    summary.requests, secs, summary.requests / secs, summary.bytes, summary.bytes / secs / 1e6,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000,
    e.connect, e.read, e.write, e.status, e.timeout))
end
