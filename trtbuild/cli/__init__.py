"""trtbuild cli."""
