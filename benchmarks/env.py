"""Machine, versions and git sha recorded beside every benchmark result."""

from __future__ import annotations

import os
import platform
import subprocess
import time

import torch


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        # Committed results are outputs, not code: a table rewritten by an earlier benchmark of the
        # same session must not mark the next one's sha dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], capture_output=True, text=True, timeout=5,
                               cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except Exception:
        return "unknown"


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command_line(module: str, argv) -> str:
    """``python -m <module> <args>`` as recorded in results: paths inside the checkout are written
    relative to its root, so a result never stores a machine-local absolute path."""
    def rel(a: str) -> str:
        if os.path.isabs(a) and os.path.commonpath([os.path.abspath(a), ROOT]) == ROOT:
            return os.path.relpath(a, ROOT)
        return a

    return " ".join(["python", "-m", module] + [rel(str(a)) for a in argv])


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict:
    import jit_kernels

    env = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "jit_kernels_backends": ",".join(jit_kernels.available_backends()),
        "git": _git_sha(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "absent"
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    return env


def write_results(stem, title: str, env: dict, rows: list[dict], cols: list[str], caption: str) -> None:
    """Write ``<stem>.json`` (env + rows) and ``<stem>.md`` (env list, caption, table of ``cols``)."""
    import json
    from pathlib import Path

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")
    lines = [f"# {title}", ""] + [f"- {k}: {v}" for k, v in env.items()] + ["", caption, ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem.with_suffix('.md')}")
