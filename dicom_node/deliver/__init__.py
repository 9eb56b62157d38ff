"""Deliver: results to their destinations, with retries and a dead-letter state."""
