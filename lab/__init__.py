"""The test and benchmark harness (not runtime): several hosts as network namespaces
(hosts, network, `make cluster`: cluster) and the faults driven on them (faults, load,
observe)."""
