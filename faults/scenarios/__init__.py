"""The scenarios; each module registers its own with ``faults.registry.scenario``."""
