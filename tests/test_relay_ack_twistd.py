"""The relay with C{--ack} end to end, through real twistd processes.

These need the server's C{--ack} (issue 9 item 4, server side), which is
built on another branch: they run once both are merged.

    lineserver-send --ack -> upstream --ack --sink tcp:...?ack=yes
                          -> downstream --ack --sink file:...

The downstream is killed with SIGKILL mid-stream and started again: every
line arrives in its file, and the sender exits 0.  Duplicates are counted:
they are lines the downstream had written but whose ACK died with it, sent
again by the relay (docs/relay.md).
"""

from __future__ import annotations

import time
from collections import Counter

from tests.ack_peer import first_arrivals
from tests.test_relay import ChainCase
from tests.test_send import lines_file, send_process


class RelayAckChainTests(ChainCase):
    relay_ack = "yes"
    downstream_args = ("--ack",)
    upstream_args = ("--ack",)

    def test_chain_acknowledged(self) -> None:
        """
        C{lineserver-send --ack} through the chain exits 0, and every line
        is in the downstream file exactly once, in order.
        """
        source, lines = lines_file(str(self.dir), 50_000)
        result = send_process("--ack", f"127.0.0.1:{self.upstream.port}", str(source))
        self.assertEqual(result.returncode, 0, result.stderr)
        # The sender's exit means the downstream acknowledged every line
        # to the upstream: they are in the file already.
        self.assertEqual(self.arrived(), lines)
        _, down = self.stop_and_check_ledgers(received=len(lines))
        self.assertEqual(down.received, len(lines))

    def test_downstream_killed_with_ack(self) -> None:
        """
        SIGKILL on the downstream mid-stream, then a restart: no line is
        lost; the sender (with C{--ack}) exits 0 only once the downstream
        has every line.
        """
        source, lines = lines_file(str(self.dir), 300_000)
        sender = self.send("--ack", "--give-up", "120", source=source)
        at_kill = self.kill_and_restart_downstream(after_lines=40_000)
        assert sender.stderr is not None
        err = sender.stderr.read()
        self.assertEqual(sender.wait(180), 0, err)
        arrived = self.arrived()
        counts = Counter(arrived)
        missing = [line for line in lines if line not in counts]
        duplicates = sum(n - 1 for n in counts.values())
        print(
            f"\nrelay ack=yes, downstream SIGKILL after {at_kill} lines: "
            f"{len(missing)} lost, {duplicates} duplicated"
        )
        self.assertEqual(missing, [])
        self.assertEqual(set(counts), set(lines))
        # First arrivals keep the order sent.
        self.assertEqual(first_arrivals(arrived), lines)
        # Every line the upstream received it delivered: the downstream
        # acknowledged it (nothing dropped, nothing left queued).
        self.stop_and_check_ledgers(received=len(lines))

    def test_sender_survives_downstream_outage(self) -> None:
        """
        The downstream down for a while: the upstream holds the lines, the
        sender's ACKs wait, and everything is acknowledged once it is back.
        """
        source, lines = lines_file(str(self.dir), 20_000)
        self.downstream.kill()
        sender = self.send("--ack", "--give-up", "120", source=source)
        time.sleep(2)  # the outage
        # Nothing can be acknowledged while the downstream is down.
        self.assertIsNone(sender.poll())
        self.downstream = self.start_downstream(self.downstream.port, name="down2")
        assert sender.stderr is not None
        err = sender.stderr.read()
        self.assertEqual(sender.wait(180), 0, err)
        self.assertEqual(set(self.arrived()), set(lines))
        _, down = self.stop_and_check_ledgers(received=len(lines))
        self.assertGreaterEqual(down.received, len(lines))
