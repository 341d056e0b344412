"""What every benchmark shares: the machine description and its section of RESULTS.md.

Each benchmark owns one section, between `<!-- begin NAME -->` and `<!-- end NAME -->`,
so `make bench` can run them one after another without losing the others' figures.
"""

import datetime
import os
import platform
import re
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
import threadpoolctl

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = "# Benchmark results\n\nEvery figure below comes from `make bench`; each section says how it was measured.\n"


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def blas():
    pools = [pool for pool in threadpoolctl.threadpool_info() if pool["user_api"] == "blas"]
    return ", ".join(f"{pool['internal_api']} {pool.get('version')} ({pool['num_threads']} threads)" for pool in pools)


def load():
    """The 1-minute load average (other processes competing for the cores)."""
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "unknown"


def machine():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"nproc {cores}, CPU {cpu_model()}, Python {platform.python_version()}, "
            f"TensorFlow {tf.__version__}, Keras {keras.__version__}, NumPy {np.__version__} "
            f"with BLAS {blas()}, {platform.system()} {platform.machine()}")


def section(title, command, load_before, method, results, interpretation):
    """The Markdown of one benchmark's section: title, when and how it ran, the method (its
    docstring), the result lines and their interpretation.

    Example:
        >>> section("Latency (benchmarks/bench_latency.py)", "benchmarks/bench_latency.py --size 96", before,
        ...         __doc__, table_lines, INTERPRETATION)
    """
    return "\n".join([
        f"## {title}", "",
        f"Generated on {datetime.datetime.now().isoformat(timespec='seconds')} by `{command}`. Machine: {machine()}. "
        f"1-minute load average {load_before} before the run, {load()} after it.", "",
        "### What is measured", "```", method.strip(), "```", "",
        "### Results", *results, "",
        "### Interpretation", interpretation,
    ])


def write_section(name, text):
    """Replaces (or appends) section `name` of RESULTS.md with `text`."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{text.strip()}\n{end}"
    current = RESULTS.read_text() if RESULTS.exists() else HEADER
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    updated = pattern.sub(lambda _: block, current) if pattern.search(current) else current.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(updated if updated.endswith("\n") else updated + "\n")
