"""Supervision: the agent's supervisor, its admin endpoint, settings shared with workers, the unit's stop-post."""
