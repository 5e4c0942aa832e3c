"""The load test (spec/load/load.py) at a modest size, as a pytest test for CI.

Not collected by `make test` (which runs `pytest spec/integration`); run it with

    python3 -m pytest -q spec/load

INVITES_STORAGE picks the storages (default internal,sql), LOAD_TEST_ARGS replaces the size
(default: 60 clients, 6 invites x 5 uses, 15 invalid tokens, i.e. 45 clients racing for 30 uses).
Each storage runs with one Prosody process and with two serving the host on that storage (the
clients split across both). The numbers are printed (pytest -s, or in the report of a failure),
never asserted.
"""

import os
import shlex

import pytest

import load

MODEST = "--clients 60 --invites 6 --uses 5 --invalid 15"
STORAGES = [s.strip() for s in os.environ.get("INVITES_STORAGE", "internal,sql").split(",") if s.strip()]


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("storage", STORAGES)
def test_racing_clients_get_exactly_the_uses_of_their_invites(storage, processes, capsys):
    argv = ["--storage", storage, "--processes", str(processes),
            *shlex.split(os.environ.get("LOAD_TEST_ARGS", MODEST))]
    status = load.main(argv)
    captured = capsys.readouterr()
    out = captured.out + captured.err
    with capsys.disabled():
        print("\n" + out)
    assert status == 0, "\n".join(line for line in out.splitlines() if "FAIL" in line or "cannot" in line) or out
