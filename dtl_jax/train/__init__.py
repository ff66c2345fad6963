"""Training machinery shared by every stage: optimisers, jitted steps, the loop."""
