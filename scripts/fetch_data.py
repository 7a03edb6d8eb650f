"""Download the bigbench source archive from PyPI once and extract the built-in tasks as JSONL.

Same as `partinfer data fetch`; run with the project's venv (`.venv/bin/python scripts/fetch_data.py [TASK ...]`).
"""

import sys

from partinfer.common.data import fetch_data

if __name__ == "__main__":
    for task, path in fetch_data(sys.argv[1:] or None).items():
        print(f"{task}\t{path}")
