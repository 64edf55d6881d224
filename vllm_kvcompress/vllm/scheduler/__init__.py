"""Scheduler side (EngineCore): the head-block KV-cache spec, the released-blocks channel, the counters."""
