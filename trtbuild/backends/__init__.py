"""trtbuild backends."""
