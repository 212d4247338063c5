"""The benchmarks of `python bench.py MODE`, one module a mode, and the helpers they share (common.py).

Inside this package the project's own modules are imported absolutely (`from serve import Service` is the
top-level serve.py, not benchmarks/serve.py): this folder is never on sys.path, only its parent is.
"""
