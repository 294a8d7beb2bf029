"""The replay and the live recorder: op-level probes, the replayed step, precision policies."""
