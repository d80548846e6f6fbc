"""`make bench` / `python -m benchmarks`: gateway overhead, throughput and budget exactness."""
