"""The fault-injection and security suite against the whole deployment (`make faults`).

A test tool: production code never imports it. See docs/reliability.md.
"""
