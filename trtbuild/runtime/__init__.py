"""trtbuild runtime."""
