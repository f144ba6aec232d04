"""Benchmarks of mmsd_ext's ops against their anchors: ``python -m benchmarks --help``.

harness.py holds the method (timing, bandwidth, CSV, table); bench_<op>.py
files hold each op's inputs, anchors and least-traffic byte counts;
workloads.py the WTAL-shaped synthetic inputs; plot.py the plots;
device_check.sh the one script for a lent GPU machine; RESULTS.md the numbers.
"""
