"""Rollouts the control plane drives: the state machine, analysis readings and the controller."""
