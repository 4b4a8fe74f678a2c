"""The agent's view of the mesh: the snapshot and its L7 tables, and `explain` over them."""
