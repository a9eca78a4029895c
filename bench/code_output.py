"""What a large program output costs the code verifier's trusted side (issue 17: a 15 MB line of NUL bytes
cost the old reader 35 s of CPU, growing with the square of the line).

`python bench/code_output.py` judges one stdin program per size that prints that many bytes on one line
(NUL bytes: the worst case for JSON, 6 bytes each escaped) and prints a markdown table: the CPU time of this
process (the trusted side: reading, parsing, comparing; the jail's processes are not counted) and wall time.
"""

from __future__ import annotations

import json
import time

from variational.verifiers.apps_check import judge

TESTS = json.dumps({"inputs": [""], "outputs": ["0"]})


def main() -> None:
    print("| output (one line of NUL bytes) | verdict | trusted CPU s | wall s |")
    print("|---|---|---|---|")
    for megabytes in (1, 4, 15, 32):
        code = f"import sys\nsys.stdout.write('\\0' * {megabytes * 10**6})"
        cpu0, wall0 = time.process_time(), time.monotonic()
        verdict = judge(f"```python\n{code}\n```", TESTS, timeout_s=10.0)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        print(f"| {megabytes} MB | {verdict.status} | {cpu:.2f} | {wall:.1f} |")


if __name__ == "__main__":
    main()
