#!/usr/bin/env python3
"""Our get() of an unknown token against Prosody's own storage read, interleaved in one
Prosody (bench/plugins/mod_invites_ab.lua), on SQLite and internal storage.

bench/run.py measures ours and Prosody's own in separate servers, minutes apart; for
operations of tens of microseconds the machine's drift between the two is larger than the
difference. This puts both in the same loop. Prints the medians of each round.

    python3 bench/ab_get_unknown.py [--storage sql,internal] [--samples 2000]
"""

import argparse
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "spec" / "integration"))
import harness  # noqa: E402


class ABServer(harness.ProsodyServer):
    @property
    def plugin_paths(self):
        return super().plugin_paths + [str(HERE / "plugins")]

    def render_config(self):  # a production log level: no debug lines in the timings
        return super().render_config().replace('min = "debug"', 'min = "info"')


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--storage", default="sql,internal")
    ap.add_argument("--samples", type=int, default=2000)
    args = ap.parse_args()
    for storage in args.storage.split(","):
        srv = ABServer(storage, extra_modules=["invites_ab"], testhook=False,
                       options={"invites_ab_samples": args.samples})
        srv.start()
        try:
            deadline = time.monotonic() + 300
            while "AB done" not in srv.log_text():
                if time.monotonic() > deadline or not srv.running:
                    print(f"{storage}: no result\n{srv.tail(20)}")
                    return 1
                time.sleep(0.5)
            for line in re.findall(r"AB (N=.*)", srv.log_text()):
                print(f"{storage:8} {line}")
        finally:
            srv.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
