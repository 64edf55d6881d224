"""Worker side: each request's head-blocks, their compression, and the worker hooks that run it."""
