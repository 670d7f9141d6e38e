"""The fleet of docs/deployment.md, run by its own script on loopback.

HAProxy (send-proxy), two twistd lineservers on haproxy: ports, one Redis
stream, a consumer-group reader; one lineserver stopped with SIGTERM
mid-stream.  The test runs scripts/fleet.py as a user would and checks
what it counted.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.redis_servers import need_redis
from tests.support import in_ci

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fleet.py"


class FleetTests(SynchronousTestCase):
    def test_every_line_read_after_one_lineserver_stops(self) -> None:
        need_redis()
        if (
            shutil.which("haproxy") is None
            and shutil.which("haproxy", path="/usr/sbin") is None
        ):
            if in_ci():
                raise AssertionError("CI=true and no haproxy (see Makefile)")
            self.skipTest("haproxy not installed (make system-tools)")
        done = subprocess.run(
            [
                sys.executable,
                str(SCRIPT),
                "--clients",
                "16",
                "--batches",
                "20",
                "--lines",
                "100",
            ],
            capture_output=True,
            timeout=600,
        )
        result = json.loads(done.stdout)
        self.assertEqual(done.returncode, 0, (result, done.stderr[-2000:]))
        self.assertEqual(result["client_errors"], [])
        # Every line the clients sent was read by the consumer group ...
        self.assertEqual(result["sent"], 16 * 20 * 100)
        self.assertEqual(result["distinct"], result["sent"])
        self.assertEqual(result["missing"], 0)
        # ... and the stream holds exactly what was read (duplicates are
        # batches a client resent after a broken connection).
        self.assertEqual(result["xlen"], result["read"])
        self.assertLessEqual(result["duplicates"], result["resent_batches"] * 100)
        # The stop came mid-stream, was an ordered one (twistd re-raises
        # SIGTERM), and both lineservers carried lines: HAProxy moved the
        # clients' later connections to the second.
        self.assertLess(result["batches_before_the_stop"], 16 * 20)
        self.assertEqual(result["stopped_exit_status"], -15)
        first, second = result["delivered_per_lineserver"]
        self.assertGreater(first, 0)
        self.assertGreater(second, 0)
        self.assertEqual(first + second, result["read"])
        # lineserver saw the clients' addresses through the PROXY header.
        self.assertEqual(result["peers"], ["127.0.0.1"])
