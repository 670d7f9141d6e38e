"""The control socket: an operator's commands to a running server.

After HAProxy's runtime API: C{--control unix:/run/lineserver.sock} takes
one command per line and answers each, in text or (with a C{json} prefix)
in JSON.  One concept per module; the first three are pure (no reactor,
no socket), the last three are the Twisted glue:

  - L{commands}: a command line to a L{Command}, or a L{CommandError}
    (L{parse}).
  - L{answers}: what a command answers (L{Answer}), in text or JSON.
  - L{dispatch}: the L{IControlTarget} contract, and a L{Command} run
    against it to an L{Answer} (or a Deferred of one).
  - L{protocol}: one operator's connection (L{ControlProtocol}).
  - L{service}: the supervised port (L{ControlService}).
  - L{target}: L{ServerControl}, the target over one L{LineServer}.

Import from the modules (C{lineserver.control.service.ControlService});
the package itself exports nothing.

The target is an interface so that a parent process of several workers
could implement it by asking each worker and adding their answers up (a
fan-out), with the parsing, the wire format and C{lineserver-ctl}
unchanged.  L{ServerControl} is the target over one L{LineServer}.

Wire format: every answer ends with an empty line.  A text answer's other
lines are never empty; an error answer is one line, C{ERR <why>}.  A JSON
answer is one line, C{{"ok": true, "result": ...}} or C{{"ok": false,
"error": "..."}}.  C{drain} answers twice: at once (draining), and once
the server has stopped (drained); then the process exits and the socket
closes.  Only the socket's file mode guards it (docs/security.md).
"""
