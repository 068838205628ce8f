"""Benchmark harness for selchat: lean load generators (native and IRC), a launcher for the servers compared, a runner.

* `loadgen`: R receivers and S senders in #lobby, spread over a few worker processes that
  each run one epoll loop over non-blocking sockets; counts frames by walking length prefixes.
* `launcher`: how to start and stop the servers under test and sample their CPU and RSS.
* `runner`: the `selchat-bench` command: points, interleaving, medians, RESULTS.md, plot.
"""
