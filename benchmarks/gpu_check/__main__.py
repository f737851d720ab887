"""``python -m benchmarks.gpu_check``: see the package docstring."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
